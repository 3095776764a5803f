"""slimkit.metrics"""

"""slimkit.data"""

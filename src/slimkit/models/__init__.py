"""slimkit.models"""

"""slimkit.recipes"""

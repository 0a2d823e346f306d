"""Shared by every test folder: this folder is on ``sys.path`` (pytest's rootdir conftest), so tests
import the helper modules here by name (``from browser import screenshot``)."""

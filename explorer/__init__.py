"""Pruning Explorer core: models, data, scores, plans, pruning, training, measurement.

Nothing under this package imports streamlit; the app in ``app.py`` and ``app_pages/`` is a
thin layer over it, and ``python -m explorer`` runs the same code headless.
"""
from explorer.errors import ExplorerError

__all__ = ["ExplorerError"]

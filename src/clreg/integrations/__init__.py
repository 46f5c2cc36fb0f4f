"""Doors into the training loops people already run; each module imports its framework when it is
imported, and the core never imports them:

* :mod:`clreg.integrations.lightning`: a Lightning callback (``pip install "clreg[lightning]"``).
"""

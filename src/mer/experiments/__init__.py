"""Experiments that compose the layers below (federated, privacy, engine, models, data).

Nothing below imports this package; entry points (``mer.run``) call into it.
"""

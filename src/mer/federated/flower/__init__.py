"""mer on Flower: the ClientApp (:mod:`.client_app`), the parts both apps share
(:mod:`.common`); the ServerApp is :mod:`mer.federated.flower_app`, which re-exports both."""

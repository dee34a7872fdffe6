"""Ditto's server (Li et al., ICML 2021) is FedAvg's: the global model w is the sample-weighted
average of the clients' local SGD. What differs is on the client (``fedtl.clients.ditto``):
each client also trains and keeps a personal model v_i pulled toward w by lambda/2 ||v - w||^2.
"""

from __future__ import annotations

from fedtl.strategies import Algorithm
from fedtl.strategies.fedavg import FedAvg

DITTO = Algorithm(FedAvg.from_config, "fedtl.clients.ditto:Ditto",
                  personal_model="v_i (local model regularised toward w)")

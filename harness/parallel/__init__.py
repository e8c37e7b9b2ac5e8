"""Where each process sits and how they work together: rank and world size from the launcher
(distributed.py), the batch arithmetic micro x accumulation x data-parallel ranks = global
(batch.py), every collective the harness makes (collectives.py), naming a rank that went away
(peers.py), tensor parallelism through DeepSpeed's AutoTP (tensor_parallel.py) and its groups'
placement on hosts (tp_layout.py). Imports harness.config and harness.common only.
"""

"""Memory: how a graph fits a device budget and how the plan is carried out.

plan.py       budget -> plan: residency, streaming, micro-batches, predicted peaks (device, evaluation, host)
placement.py  the one owner of where every frozen tensor lives, per phase of a run, from a plan or none
stream.py     layer-group streaming: page-locked host slabs, device slots, prefetch in both directions
checkpoint.py checkpointed layer groups (keep the input, recompute in backward)
report.py     measuring memory the same way everywhere: RSS, CUDA peaks, LiveBytes on any device
"""

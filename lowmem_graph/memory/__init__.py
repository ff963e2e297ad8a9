"""Memory: how a graph fits a device budget and how the plan is carried out.

profile.py    what each node weighs, layer by layer, from configs on the meta device; the trainable count
estimate.py   the peaks of one placement: training step, evaluation, host; the Plan types
search.py     budget -> plan: residency, streaming, micro-batches, schedule (make_plan), the fastest that fits
cost.py       a placement's predicted times on a device: step, evaluation, frozen pass, epoch; the bottleneck
devices.py    device profiles: built-in cards from their spec sheets, measured ones (bench/calibrate.py) found
budget.py     --gpu-mem / --host-mem as bytes; whether the devices have room now
disk.py       the disk tier's plan: which layer groups live on disk when the host budget cannot hold them all
store.py      the disk tier's store: those groups in one safetensors file of the node cache, read into staging
plan.py       the planner's names re-exported for older importers (defines nothing)
placement.py  the one owner of where every frozen tensor lives, per phase of a run, from a plan or none
stream.py     layer-group streaming: host slabs, device slots, prefetch in both directions
host.py       page-locked host memory (the slabs, cached rows, kept activations) and its CUDA runtime calls
checkpoint.py checkpointed layer groups (keep the input, recompute in backward), as hooks on the layers' forwards
report.py     measuring memory the same way everywhere (RSS, CUDA peaks, LiveBytes on any device); the plan's table
"""

"""The budget planner's names in one place (`--gpu-mem 6G` -> a Plan), kept for the importers that use them:

profile.py   what each node weighs, layer by layer, from configs on the meta device; the trainable count
estimate.py  the peaks of one placement (training step, evaluation, host) and the Plan types
search.py    the search: layer groups, residency, prefetch depth, micro-batch, schedule -> make_plan
budget.py    --gpu-mem / --host-mem as bytes, nodes' devices, whether the devices have room now
report.py    format_plan: the table `lowmem-graph plan` prints

Nothing is defined here; new code imports from the module that defines a name.
"""
from .budget import (  # noqa: F401
    check_device_room,
    device_needs,
    host_available,
    node_devices,
    parse_budgets,
    parse_size,
)
from .estimate import (  # noqa: F401
    CACHE_SHARD_BYTES,
    HOST_RUNTIME,
    LAYER_MAJOR,
    LAYER_MAJOR_HOST,
    MICRO_BATCH_MAJOR,
    FrozenPlacement,
    GroupPlan,
    Plan,
    cached_on_device,
    eval_breakdown,
    host_breakdown,
    pinned_bound,
    traffic,
)
from .profile import (  # noqa: F401
    ACT_BYTES,
    ATTN_SAVED,
    CUDA_CONTEXT,
    EAGER_SCORE_BYTES,
    FUSED_QKV_SAVED,
    HEAD_PER_TOKEN,
    INT8_SCALE_BYTES,
    INT8_TOKEN_BYTES,
    LAYER_BACKWARD,
    LAYER_INFERENCE,
    LAYER_MASK_BYTES,
    LSE_BYTES,
    MASK_BYTES,
    MLP_SAVED,
    NF4_BLOCK,
    NF4_BLOCK2,
    NF4_TABLES,
    NORM_SAVED,
    PARAM_BYTES,
    POSITION_BYTES,
    QUANT_BYTES,
    SMALL_BYTES,
    TRAIN_BYTES_PER_PARAM,
    forward_tables,
    layer_backward,
    layer_bytes,
    layer_inference,
    layer_saved,
    node_profile,
    output_node_params,
    quant_workspace,
    trainable_count,
)
from .report import GiB, KiB, MiB, format_plan  # noqa: F401
from .search import GROUP_SIZES, SEARCH_STEP, make_plan, with_placement  # noqa: F401

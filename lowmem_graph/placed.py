"""The graph built for a run's settings and placed (memory/placement.py): everything on the device, or under a
--gpu-mem plan, nodes in host memory with each phase moving what it needs. The same for training and evaluation."""
from __future__ import annotations

import dataclasses

import torch

from . import distributed
from .questions import Question, format_prompt
from .edge_graph import EdgeGraph
from .errors import UserError
from .settings import TrainConfig
from .spec import GraphSpec


def describe_device(device: torch.device, cfg: TrainConfig) -> str:
    """Where the run computes, said once at its start (and why, when a GPU was expected but none is there)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"device: {device} ({props.name}, {props.total_memory / 2 ** 30:.1f} GiB)"
    why = ""
    if cfg.device == "auto":
        why = " (no GPU found, running on CPU"
        why += f"; --gpu-mem {cfg.gpu_mem} is planned as on a GPU)" if cfg.gpu_mem else ")"
    return f"device: {device}{why}, {torch.get_num_threads()} threads"


class PlacedGraph:
    """The graph built for a run's settings, and its placement (memory/placement.py): everything on the device, or
    under a --gpu-mem plan, nodes in host memory with each phase moving what it needs. The same for training and
    evaluation. Two explicit calls: `frozen_states` (the frozen pass) and `start_steps` (the refiners' upper
    layers placed for training or evaluation)."""

    def __init__(self, spec: GraphSpec, cfg: TrainConfig, log=print, progress: bool = True):
        from .memory.placement import Placement

        self.cfg, self.log, self.progress = cfg, log, progress
        self.device = cfg.resolved_device()
        log(describe_device(self.device, cfg))
        self.plan = None
        self.cached = cfg.prefix_cache
        placed_nodes = [n.name for n in spec.nodes if n.device]
        if placed_nodes and distributed.current().active:
            raise UserError(f"node {placed_nodes[0]} names its device, and the run has several ranks: every rank "
                            "would put it on that same GPU. Use one or the other (nodes on devices in one process, "
                            "or data parallel over whole copies)")
        if cfg.gpu_mem:
            from .memory.placement import _exact as _exact_device
            from .memory.budget import check_device_room, parse_budgets, parse_size
            from .memory.firstrun import format_first_run
            from .memory.report import format_plan
            from .memory.search import make_plan

            if not cfg.prefix_cache:
                raise UserError("a --gpu-mem plan trains from the prefix cache: drop prefix_cache: false")
            planned = dataclasses.replace(spec, train={**spec.train, "objective": cfg.objective})
            host = parse_size(cfg.host_mem) if cfg.host_mem else None
            self.plan = make_plan(planned, parse_budgets(cfg.gpu_mem), cfg.batch_size, spec.max_length, host,
                                  main=str(_exact_device(self.device)))
            log(format_plan(self.plan, spec))
            first = format_first_run(spec, self.plan.device, torch.bfloat16 if self.device.type == "cuda"
                                     else torch.float32)
            if first:
                log("\n".join(first))
            check_device_room(self.plan, str(_exact_device(self.device)))
        self.placement = Placement(self.device, self.plan)
        self.graph = distributed.main_first(lambda: EdgeGraph.build(
            spec, self.device, progress=log if progress else None, seed=cfg.seed,
            load_device=self.placement.load_device, objective=cfg.objective, loaded=self.placement.spill),
            distributed.current())

    @property
    def micro_batch(self) -> int:
        """Examples per forward, in training and evaluation alike: the plan's micro-batch, else the whole batch."""
        return self.plan.micro_batch if self.plan is not None else self.cfg.batch_size

    def frozen_states(self, *question_sets: list[Question]) -> list:
        """The model-major frozen pass over each set of questions (cached), each node placed as the plan says.
        What `start_steps` placed is given back first: the pass needs the room."""
        return self.frozen_items(*([(q.id, format_prompt(q)) for q in questions] for questions in question_sets))

    def frozen_items(self, *item_sets: list[tuple[str, str]]) -> list:
        """The frozen pass over each set of (id, text) items (cached): questions as prompts, or the lm objective's
        passages. Every set's missing entries are checked against the disk before the first node runs."""
        from .cache import PrefixCache
        from .frozen_pass import check_cache_room, run_frozen_pass
        from .tiny import cache_root

        self.stop_steps()
        cache = PrefixCache(self.cfg.cache_dir or cache_root() / "prefix", log=self.log)
        batch = self.plan.frozen_micro_batch if self.plan is not None else self.cfg.batch_size
        check_cache_room(self.graph, item_sets, cache)
        return [run_frozen_pass(self.graph, items, cache, batch, self.progress, self.placement)
                for items in item_sets]

    def start_steps(self) -> None:
        """The refiners' upper layers placed for training and evaluation (resident or streamed)."""
        self.placement.start_steps(self.graph)

    def stop_steps(self) -> None:
        self.placement.stop_steps()

    @property
    def streamers(self):
        return self.placement.streamers


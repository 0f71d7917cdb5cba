"""Pretraining loop on megatron-core: model, DDP, optimizer, schedules, checkpoints, metrics.

Launched by torchrun (one process per device). The order matters for the user promise that a
bad config never hangs a job: the config and checkpoint folder are validated before the process
group exists.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_moe_ext.config import Config, to_yaml, validate_world
from megatron_moe_ext.runtime.device import Runtime, launch_info, resolve_device, setup_runtime
from megatron_moe_ext.training import checkpoint as ckpt
from megatron_moe_ext.training.metrics import Progress, format_duration

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Counters that a checkpoint restores."""

    iteration: int = 0
    """Optimizer steps done."""
    consumed_samples: int = 0
    """Training samples consumed over all data-parallel ranks."""
    losses: list = field(default_factory=list)
    """(iteration, loss) of every step of this process (for tests and the final summary)."""


class _StopRequest:
    """SIGTERM / SIGUSR1 (slurm preemption or time limit): save at the end of this step, exit."""

    def __init__(self, enabled: bool) -> None:
        self.flag = False
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.flag = True

    def agreed(self, group: dist.ProcessGroup) -> bool:
        """True on every rank when any rank received the signal."""
        t = torch.tensor([1.0 if self.flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return bool(t.item() > 0)


def configure_logging(level: str, rank: int) -> None:
    """Rank 0 logs at `level`, others at WARNING."""
    logging.basicConfig(
        level=getattr(logging, level) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )


class Trainer:
    """Everything built for one run; :meth:`train` runs it."""

    def __init__(self, cfg: Config) -> None:
        from megatron_moe_ext.megatron import versions

        rank, world, _, _ = launch_info()
        configure_logging(cfg.logging.level, rank)
        versions.check_supported()  # one clear error naming the supported range
        self.cfg = cfg
        device = resolve_device(cfg.runtime)
        self.dp_size = validate_world(cfg, world, device)
        versions.validate_config(cfg)  # options this megatron-core cannot do: a config error
        self.resume_point = ckpt.find_resume_point(cfg)  # before any process group
        if self.resume_point is not None:
            ckpt.check_layout(cfg, self.resume_point, world)
        self.rt: Runtime = setup_runtime(cfg.runtime, device)
        if self.rt.rank == 0:
            logger.info("resolved config:\n%s", to_yaml(cfg))
        self._init_parallel()
        self._build()

    # ---------------------------------------------------------------- construction
    def _init_parallel(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.process_groups_config import ProcessGroupCollection

        p = self.cfg.parallel
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor,
            pipeline_model_parallel_size=p.pipeline,
            expert_model_parallel_size=p.expert,
            expert_tensor_parallel_size=p.expert_tensor,
            distributed_timeout_minutes=self.cfg.runtime.timeout_minutes,
        )
        self.pg = ProcessGroupCollection.use_mpu_process_groups()
        self.ps = ps
        self._seed(0)

    def _seed(self, iteration: int) -> None:
        """Seeds are a function of (seed, iteration), so a resumed run draws the same dropout."""
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        seed = self.cfg.train.seed + 100003 * iteration
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)

    def _build(self) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_moe_ext.megatron.model import build_model, build_transformer_config, pad_vocab
        from megatron_moe_ext.training import data as data_mod
        from megatron_moe_ext.training.metrics import (
            ExpertLoadTracker,
            ImbalanceTracker,
            LayerTimeTracker,
            MetricsWriter,
        )

        cfg, tr = self.cfg, self.cfg.train
        self.tokenizer = data_mod.build_tokenizer(cfg)
        self.vocab_size = cfg.model.vocab_size or pad_vocab(self.tokenizer.vocab_size)
        self.tconf = build_transformer_config(cfg, self.rt.device.type)
        self.tconf.finalize_model_grads_func = finalize_model_grads
        self.pre = self.ps.is_pipeline_first_stage()
        self.post = self.ps.is_pipeline_last_stage()
        module = build_model(cfg, self.tconf, self.vocab_size, self.pg, self.pre, self.post)
        self._log_moe_layers(module)  # build_model checked them (no silent fallback)
        if self.rt.device.type == "cuda":
            module = module.cuda()
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=tr.overlap_grad_reduce,
            use_distributed_optimizer=tr.use_distributed_optimizer,
            bucket_size=tr.ddp_bucket_size,
        )
        self.model = [DistributedDataParallel(self.tconf, ddp_config, module)]
        from megatron_moe_ext.megatron.comm_priority import install_comm_priority

        self.comm_priority = install_comm_priority(self.model, cfg, self.rt.device)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=tr.lr,
                min_lr=tr.min_lr,
                weight_decay=tr.weight_decay,
                adam_beta1=tr.adam_beta1,
                adam_beta2=tr.adam_beta2,
                adam_eps=tr.adam_eps,
                clip_grad=tr.clip_grad,
                bf16=tr.precision == "bf16",
                params_dtype=self.tconf.params_dtype,
                use_distributed_optimizer=tr.use_distributed_optimizer,
            ),
            self.model,
        )
        self.tconf.grad_scale_func = self.optimizer.scale_loss
        if tr.overlap_grad_reduce:
            self.tconf.no_sync_func = self.model[0].no_sync
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if tr.lr_warmup_iters else tr.lr,
            max_lr=tr.lr,
            min_lr=tr.min_lr,
            lr_warmup_steps=tr.lr_warmup_iters,
            lr_decay_steps=tr.lr_decay_iters or tr.iters,
            lr_decay_style=tr.lr_decay_style,
            start_wd=tr.weight_decay,
            end_wd=tr.weight_decay,
            wd_incr_steps=tr.iters,
            wd_incr_style="constant",
        )
        self.state = TrainState()
        if self.resume_point is not None:
            self.state.iteration, self.state.consumed_samples = ckpt.load_checkpoint(
                cfg, self.resume_point, self.model, self.optimizer, self.scheduler
            )
        self.num_microbatches = tr.global_batch_size // (tr.micro_batch_size * self.dp_size)
        eval_samples = tr.eval_iters * tr.global_batch_size * (tr.iters // max(1, tr.eval_interval) + 1)
        self.train_ds, self.valid_ds, _ = data_mod.build_datasets(
            cfg, self.tokenizer, tr.iters * tr.global_batch_size, eval_samples, 0
        )
        self.dp_rank = self.ps.get_data_parallel_rank()
        self.train_iter = data_mod.build_data_iterator(
            self.train_ds, tr.micro_batch_size, self.dp_rank, self.dp_size,
            self.state.consumed_samples, tr.seed,
        )
        self.load_tracker = ExpertLoadTracker(self.model, cfg.moe.num_experts)
        self.time_tracker = LayerTimeTracker(self.model)
        self.imbalance_tracker = ImbalanceTracker(self.model, cfg)
        from megatron_moe_ext.traffic.recorder import recorder_from_config  # logging.routing_trace
        self.routing_recorder = recorder_from_config(
            cfg, self.model, self.ps.get_data_parallel_group(), self.num_microbatches)
        self.writer = MetricsWriter(cfg, enabled=self.rt.rank == 0)
        self.stop = _StopRequest(cfg.checkpoint.save_on_signal)
        n_params = sum(p.numel() for p in self.model[0].parameters())
        logger.info(
            "model: %s with %d layers, %d experts (%s), %.2fM parameters on rank 0; "
            "world %d = tp %d x pp %d x dp %d, ep %d; %d micro-batches per iteration",
            cfg.model.type, cfg.model.num_layers, cfg.moe.num_experts, cfg.moe.impl,
            n_params / 1e6, self.rt.world_size, cfg.parallel.tensor, cfg.parallel.pipeline,
            self.dp_size, cfg.parallel.expert, self.num_microbatches,
        )

    def _log_moe_layers(self, module: torch.nn.Module) -> None:
        """Rank 0: which MoE class, router and expert module each MoE layer of its stage has."""
        from megatron_moe_ext.megatron.model import describe_moe_layers
        from megatron_moe_ext.megatron.versions import version_string

        if self.rt.rank != 0:
            return
        logger.info("megatron-core %s", version_string())
        for r in describe_moe_layers(module):
            shared = r["shared_experts_class"]
            logger.info("MoE layer %d (%s): %s, router %s, experts %s x%d%s", r["layer_number"],
                        r["name"], r["moe_class"].__name__, r["router_class"].__name__,
                        r["experts_class"].__name__, r["num_local_experts"],
                        f", shared experts {shared.__name__}" if shared else "")

    # ---------------------------------------------------------------- steps
    def _forward_step(self, data_iterator: Iterator, model: torch.nn.Module):
        from megatron_moe_ext.training import data as data_mod
        from megatron_moe_ext.training.losses import bert_loss, gpt_loss

        batch = data_mod.get_batch(self.cfg, data_iterator)
        dev = self.rt.device
        batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if self.cfg.model.type == "gpt":
            out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            return out, lambda o: gpt_loss(o, batch["loss_mask"])
        mask = batch["padding_mask"]
        types = batch["types"] if self.cfg.model.bert_binary_head else None
        out = model(batch["text"], mask, tokentype_ids=types, lm_labels=batch["labels"])
        return out, lambda o: bert_loss(o, batch, self.cfg.model.bert_binary_head)

    def _run_microbatches(self, data_iterator: Iterator, forward_only: bool) -> dict[str, float]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        tr = self.cfg.train
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=data_iterator,
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=tr.micro_batch_size,
            forward_only=forward_only,
        )
        return self._reduce_losses(losses)

    def _reduce_losses(self, losses: list[dict]) -> dict[str, float]:
        """Mean of each reported loss over micro-batches and data-parallel ranks, on every rank
        (the last pipeline stage computes them; it broadcasts to the others)."""
        keys = ["loss", "lm_loss", "sop_loss"]
        t = torch.zeros(len(keys) + 1, dtype=torch.float64)
        if self.post and losses:
            for rec in losses:
                for i, k in enumerate(keys):
                    if k in rec:
                        t[i] += float(rec[k])
            t[-1] = len(losses)
            dist.all_reduce(t, group=self.ps.get_data_parallel_group())
        pp = self.ps.get_pipeline_model_parallel_group()
        if dist.get_world_size(pp) > 1:
            dist.broadcast(t, src=self.ps.get_pipeline_model_parallel_last_rank(), group=pp)
        n = max(1.0, float(t[-1]))
        return {k: float(t[i]) / n for i, k in enumerate(keys) if t[i] != 0}

    def _traced_layers(self) -> list:
        """FasterMoE layers that record a timeline (moe.fastermoe.trace: true)."""
        return [m for m in self.model[0].modules() if getattr(m, "tracer", None) is not None]

    def write_traces(self) -> list[str]:
        """Chrome traces of the last iteration, one file per rank and MoE layer."""
        fm = self.cfg.moe.fastermoe
        directory = fm.trace_dir or os.path.join(self.cfg.logging.dir, "traces")
        paths = [layer.write_trace(directory) for layer in self._traced_layers()]
        if paths and self.rt.rank == 0:
            logger.info("FasterMoE timelines of the last iteration in %s "
                        "(render: python scripts/render_timeline.py %s/*.json --out timeline.png)",
                        directory, directory)
        return [p for p in paths if p]

    def train_step(self) -> tuple[dict[str, float], float, bool]:
        """One iteration: forward/backward over micro-batches, optimizer step, LR step."""
        for layer in self._traced_layers():
            layer.tracer.clear()  # keep the last iteration only
        self._seed(self.state.iteration + 1)
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._run_microbatches(self.train_iter, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        self.state.iteration += 1
        self.state.consumed_samples += self.cfg.train.global_batch_size
        return losses, float(grad_norm) if grad_norm is not None else math.nan, bool(ok)

    def evaluate(self) -> dict[str, float]:
        """Validation loss over eval_iters global batches (deterministic slice of the split)."""
        from megatron_moe_ext.training import data as data_mod

        tr = self.cfg.train
        it = data_mod.build_data_iterator(
            self.valid_ds, tr.micro_batch_size, self.dp_rank, self.dp_size, 0, tr.seed
        )
        for m in self.model:
            m.eval()
        totals: dict[str, float] = {}
        with torch.no_grad():
            for _ in range(tr.eval_iters):
                for k, v in self._run_microbatches(it, forward_only=True).items():
                    totals[k] = totals.get(k, 0.0) + v / tr.eval_iters
        for m in self.model:
            m.train()
        self.load_tracker.counts.clear()
        self.time_tracker.collect()
        self.imbalance_tracker.reset()
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
        return totals

    # ---------------------------------------------------------------- loop
    def _record(self, losses: dict, grad_norm: float, dt: float, window: int) -> dict[str, Any]:
        from megatron_moe_ext.training.metrics import collect_aux_losses

        cfg = self.cfg
        tokens = cfg.train.global_batch_size * cfg.model.seq_length
        dp_group = self.ps.get_data_parallel_group()
        pp_group = self.ps.get_pipeline_model_parallel_group()
        ep_group = self.ps.get_expert_model_parallel_group()
        matrices = self.load_tracker.count_matrices(ep_group, window)
        load = self.load_tracker.collect(dp_group, pp_group, window)
        cost = self.imbalance_tracker.collect(matrices, ep_group, pp_group, window)
        aux = collect_aux_losses(dp_group, pp_group, self.num_microbatches * window)
        timing = self._gather_timing(pp_group, window)
        rec: dict[str, Any] = {
            "iteration": self.state.iteration,
            "loss": losses.get("loss", math.nan),
            "lr": self.scheduler.get_lr(self.optimizer.param_groups[0]),
            "grad_norm": grad_norm,
            "iter_time_s": dt,
            "tokens_per_s": tokens / dt if dt > 0 else 0.0,
            "consumed_samples": self.state.consumed_samples,
        }
        for k in ("lm_loss", "sop_loss"):
            if k in losses:
                rec[k] = losses[k]
        rec["moe"] = {
            f"layer_{k}": dict(
                v,
                **{name: vals[k - 1] for name, vals in aux.items() if k - 1 < len(vals)},
                **timing.get(k, {}),
                **cost.get(k, {}),
            )
            for k, v in load.items()
        }
        return rec

    def _gather_timing(self, pp_group, window: int) -> dict[int, dict[str, Any]]:
        """Per MoE layer: measured fwd+bwd seconds per iteration (this rank), the FasterMoE
        layer's predicted seconds and its shadowed experts; gathered over pipeline stages."""
        local = self.time_tracker.collect()
        for rec in local.values():
            for key in ("measured_s", "predicted_s", "prefetch_exposed_s"):
                if key in rec:
                    rec[key] /= max(1, window)
        if dist.get_world_size(pp_group) > 1:
            parts: list[Any] = [None] * dist.get_world_size(pp_group)
            dist.all_gather_object(parts, local, group=pp_group)
            local = {k: v for part in parts for k, v in part.items()}
        return local

    def train(self) -> TrainState:
        """Run until train.iters (or exit_after_iters, or a stop signal); save; return state."""
        cfg, tr = self.cfg, self.cfg.train
        st = self.state
        end = min(tr.iters, tr.exit_after_iters or tr.iters)
        world = dist.group.WORLD
        if st.iteration >= end:
            logger.info("nothing to do: checkpoint is at iteration %d >= %d", st.iteration, end)
        logger.info("training iterations %d..%d", st.iteration + 1, end)
        window_t, window_n = 0.0, 0
        saved_at = -1
        progress = Progress()
        while st.iteration < end:
            t0 = time.perf_counter()
            losses, grad_norm, ok = self.train_step()
            dt = time.perf_counter() - t0
            window_t, window_n = window_t + dt, window_n + 1
            progress.add(dt)
            st.losses.append((st.iteration, losses.get("loss", math.nan)))
            if not ok:
                logger.warning("iteration %d skipped: non-finite gradients", st.iteration)
            if st.iteration % cfg.logging.interval == 0 or st.iteration == end:
                rec = self._record(losses, grad_norm, window_t / window_n, window_n)
                if self.routing_recorder is not None:
                    self.routing_recorder.record(st.iteration)
                self.writer.write(rec)
                logger.info(
                    "iter %d/%d | loss %.4f | lr %.3e | grad norm %.3f | %.1f ms/iter | "
                    "%.0f tokens/s | eta %s",
                    st.iteration, tr.iters, rec["loss"], rec["lr"], grad_norm,
                    1e3 * rec["iter_time_s"], rec["tokens_per_s"],
                    format_duration(progress.eta_s(end - st.iteration)),
                )
                window_t, window_n = 0.0, 0
            if tr.eval_interval and st.iteration % tr.eval_interval == 0:
                self._log_eval()
            if cfg.checkpoint.save and cfg.checkpoint.interval and st.iteration % cfg.checkpoint.interval == 0:
                ckpt.save_checkpoint(cfg, self.model, self.optimizer, self.scheduler, st.iteration, st.consumed_samples)
                saved_at = st.iteration
            if self.stop.agreed(world):
                logger.warning("stop signal received: saving and exiting at iteration %d", st.iteration)
                break
        if cfg.checkpoint.save and saved_at != st.iteration and st.iteration > 0:
            if (ckpt.iter_dir(cfg.checkpoint.save, st.iteration) / ckpt.MARKER).is_file():
                pass  # resumed exactly at a saved iteration with nothing to do
            else:
                ckpt.save_checkpoint(cfg, self.model, self.optimizer, self.scheduler, st.iteration, st.consumed_samples)
        self.write_traces()
        if tr.eval_iters and not tr.eval_interval and st.iteration >= tr.iters:
            self._log_eval()
        self.writer.close()
        return st

    def _log_eval(self) -> None:
        res = self.evaluate()
        rec = {"iteration": self.state.iteration, **{f"val_{k}": v for k, v in res.items()}}
        self.writer.write(rec)
        logger.info("validation at iter %d | %s", self.state.iteration,
                    " | ".join(f"{k} {v:.4f}" for k, v in res.items()))


def shutdown() -> None:
    """Tear down process groups."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run(cfg: Config, after: Optional[Callable[[Trainer], None]] = None) -> TrainState:
    """Build, train, shut down; `after` sees the trainer before shutdown (tests)."""
    trainer = Trainer(cfg)
    state = trainer.train()
    if after is not None:
        after(trainer)
    shutdown()
    return state

"""Sharded training (`--sharding fsdp`): FSDP2 through Accelerate's plugin (docs/sharding.md).

What a sharded run needs beyond DDP, and nothing about models or diffusion:
- `check_launch`, `fsdp_plugin` and `shard_with`: an FSDP accelerate config checked against
  the flags, the plugin made from the flags, and the Accelerator turned to it on CPU processes
  (where Accelerate 1.16 itself never chooses FSDP);
- `set_units`: the network's blocks, one FSDP unit each (the backbone names them);
- `network_class`: a network's own class behind FSDP2's `FSDP<Class>` wrapper class;
- `weightless_copy` and `full_copy`: a whole copy of the network, for sampling and the export;
- `training_state` and `load_training_state`: weights, EMA and optimizer state as one flat
  dict of tensors (DTensors: this process's shard) for torch.distributed.checkpoint, and back.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.parallelism_config import ParallelismConfig
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, str_to_bool
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from ddp_utils.checkpoint import PARTS
from ddp_utils.errors import InputError
from ddp_utils.guard import unwrap_optimizer

Sharding = Literal["none", "fsdp", "hsdp"]

# The prefixes of the three parts of a sharded checkpoint's tensors.
MODEL, EMA_PREFIX, OPTIMIZER = (f"{part}." for part in PARTS)
_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp_plugin(cpu_offload: bool) -> FullyShardedDataParallelPlugin:
    """Accelerate's FSDP2 plugin as the toolkit uses it: every field set here (none read from
    an accelerate config's `fsdp_*` environment), the units named later by `set_units`.

    Activation checkpointing is the network's own (`--gradient-checkpointing`): the plugin's
    wraps every unit and renames its parameters. The mixed precision policy is set by
    `shard_with`, once the Accelerator has resolved `--mixed-precision`. The initial weights
    are the main process's on every process, as DDP's are (each process drew its own: the
    seeds differ by rank): `cpu_ram_efficient_loading` shards the main process's weights and
    sends the others theirs.
    """
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[],
        # Pinned host memory (faster copies to the GPU) needs CUDA; CPU processes offload to
        # the memory they compute in, unpinned (torch's default pins, and fails without CUDA).
        cpu_offload=CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        if cpu_offload
        else False,
        state_dict_type="SHARDED_STATE_DICT",
        activation_checkpointing=False,
        cpu_ram_efficient_loading=True,
    )


# What Accelerate writes into this process's environment when given a plugin: other code reads
# them (transformers' from_pretrained loads weights on the main process only, the others on the
# meta device, when both are true), and so would the next run of an in-process caller.
PLUGIN_ENVIRONMENT = ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")


@contextlib.contextmanager
def environment_kept(names: Sequence[str] = PLUGIN_ENVIRONMENT) -> Iterator[None]:
    """Put these environment variables back as they were when the block ends."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def shard_with(
    accelerator: Accelerator,
    plugin: FullyShardedDataParallelPlugin,
    shard_size: int | None = None,
) -> None:
    """Make `accelerator` (built with `fsdp_plugin=plugin`) shard with FSDP2 on N processes;
    `shard_size` (HSDP): in groups of that many processes, each group holding a whole copy.

    On GPUs Accelerate has done it already. On CPU processes over gloo it chose MULTI_CPU
    (its `AcceleratorState.__init__` turns a plugin into FSDP for accelerator process groups
    only): this does what that code does for them, and nothing else: the shared state's
    distributed type becomes FSDP and its plugin this one. Every later call (`prepare`,
    `accumulate`, `clip_grad_norm_`, `reduce`) then runs Accelerate's FSDP2 code unchanged.
    One process is never sharded (Accelerate's `NO`), on any device.

    The mixed precision policy: parameters cast to the autocast dtype for compute, gradients
    reduced in fp32 onto fp32 master weights (Accelerate's own default reduces in bf16).
    """
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if accelerator.distributed_type != DistributedType.NO:
        assert accelerator.is_fsdp2 and state.fsdp_plugin is plugin, accelerator.distributed_type
    if shard_size is not None and accelerator.num_processes > 1:
        # HSDP: a 2-D mesh (replicas x shards) that Accelerate's FSDP2 preparation shards over
        # (`fsdp2_prepare_model`: `mesh[parallelism_config.fsdp_dim_names]`). These are the
        # lines `Accelerator.__init__` runs for a `parallelism_config`; they run here, once the
        # state is FSDP, because its check refuses MULTI_CPU (the CPU processes of the tests).
        config = ParallelismConfig(
            dp_replicate_size=accelerator.num_processes // shard_size, dp_shard_size=shard_size
        )
        state.parallelism_config = config
        state.device_mesh = config.get_device_mesh(accelerator.device.type)
        config._validate_accelerator(accelerator)
    dtype = _COMPUTE_DTYPES.get(accelerator.mixed_precision)
    plugin.mixed_precision_policy = (
        None
        if dtype is None
        else MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    )


def check_launch(sharding: Sharding, cpu_offload: bool) -> None:
    """An accelerate config with `distributed_type: FSDP` (its launcher exports
    ACCELERATE_USE_FSDP and FSDP_*) agrees with the flags, which decide: the toolkit builds its
    own plugin and records the flags with the run. InputError naming what to change."""
    env = os.environ
    if not str_to_bool(env.get("ACCELERATE_USE_FSDP", "false"), to_bool=True):
        return
    if sharding == "none":
        raise InputError(
            "the accelerate config asks for FSDP (distributed_type: FSDP): add --sharding fsdp "
            "(docs/sharding.md), or launch with a DDP config (accelerate_configs/"
            "1node_8gpu_bf16.yaml)",
            "sharding",
        )
    if env.get("FSDP_VERSION", "2") != "2":
        raise InputError(
            f"the accelerate config says fsdp_version: {env['FSDP_VERSION']}; this toolkit "
            "shards with FSDP2: set fsdp_version: 2 (accelerate_configs/1node_8gpu_fsdp.yaml)",
            "sharding",
        )
    if str_to_bool(env.get("FSDP_OFFLOAD_PARAMS", "false"), to_bool=True) and not cpu_offload:
        raise InputError(
            "the accelerate config says fsdp_offload_params: true: give --fsdp-cpu-offload "
            "(the flag decides, and is saved with the run), or drop it from the config",
            "fsdp_cpu_offload",
        )
    if str_to_bool(env.get("FSDP_ACTIVATION_CHECKPOINTING", "false"), to_bool=True):
        raise InputError(
            "the accelerate config says fsdp_activation_checkpointing: true, which renames "
            "every parameter: use --gradient-checkpointing (the network's own) instead",
            "sharding",
        )


def set_units(accelerator: Accelerator, class_names: Sequence[str]) -> None:
    """Shard every submodule of these classes as one FSDP unit (the rest: the root unit)."""
    accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = list(class_names)


def network_class(net: nn.Module) -> type[nn.Module]:
    """The network's own class: FSDP2 turns a sharded `Net` into an `FSDPNet(FSDPModule, Net)`."""
    return next(c for c in type(net).__mro__ if not issubclass(c, FSDPModule))


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: a DTensor's local shard (sharing its storage), or the
    tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def weightless_copy(net: nn.Module) -> nn.Module:
    """A copy of `net` (not yet sharded) whose parameters are on the meta device: no memory,
    every buffer real (non-persistent ones, such as a DiT's position table, are in no state
    dict). `full_copy` fills it."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for p in net.parameters()
    }
    return copy.deepcopy(net, memo)


@torch.no_grad()
def full_copy(
    template: nn.Module,
    net: nn.Module,
    device: torch.device,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A whole, unsharded copy of `net` on `device`, in eval mode (collective: every process
    gathers every sharded tensor). `weights`: other weights keyed like the network's
    parameters and buffers (the EMA's), in place of the network's own (all of them, or the
    trainable ones of a partly frozen network: an adapter's, on its frozen base)."""
    weights = {**dict(net.named_parameters()), **dict(net.named_buffers()), **(weights or {})}
    whole = copy.deepcopy(template)
    for name, value in weights.items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        module_name, _, attribute = name.rpartition(".")
        module = whole.get_submodule(module_name)
        value = value.detach().to(device, copy=True)
        if attribute in dict(module.named_parameters(recurse=False)):
            value = nn.Parameter(value, requires_grad=False)
        setattr(module, attribute, value)
    missing = [name for name, p in whole.named_parameters() if p.is_meta]
    assert not missing, f"weights missing for {missing[:5]}"
    return whole.eval()


def partly_frozen(model: nn.Module) -> bool:
    """Whether some of the network's parameters do not train (an adapter's base)."""
    return not all(p.requires_grad for p in model.parameters())


def training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, ema_state: Mapping[str, torch.Tensor] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What a sharded checkpoint holds: {name: tensor} (DTensors: this process's shard) for
    torch.distributed.checkpoint, and the JSON-able rest (the optimizer's hyper-parameters).

    Names: `model.<parameter>`, `ema.<parameter>`, `optimizer.<parameter>.<state>`
    (`exp_avg`, `exp_avg_sq`, `step`), parameters by their names in the network, whatever the
    number of processes: any number of processes can read it back (torch's state-dict API).
    """
    # A partly frozen network (an adapter on a pretrained base): its trainable parameters
    # only, as `trained_weights` keeps them (the base is read again from where it came).
    options = StateDictOptions(ignore_frozen_params=partly_frozen(model))
    tensors = {MODEL + k: v for k, v in get_model_state_dict(model, options=options).items()}
    if ema_state is not None:
        tensors.update({EMA_PREFIX + k: v for k, v in ema_state.items()})
    optimizer_state = get_optimizer_state_dict(model, unwrap_optimizer(optimizer))
    scalars: dict[str, dict[str, Any]] = {}
    for name, values in optimizer_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIMIZER}{name}.{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": optimizer_state["param_groups"], "scalars": scalars}


def load_training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    rest: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """Put `training_state`'s tensors (read back) and rest into the model and optimizer;
    return the EMA's tensors (keyed like the network's)."""
    model_state = {k.removeprefix(MODEL): v for k, v in tensors.items() if k.startswith(MODEL)}
    set_model_state_dict(
        model, model_state, options=StateDictOptions(strict=not partly_frozen(model))
    )
    state: dict[str, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(OPTIMIZER):
            parameter, key = name.removeprefix(OPTIMIZER).rsplit(".", 1)
            state.setdefault(parameter, {})[key] = value
    for parameter, values in rest.get("scalars", {}).items():
        state.setdefault(parameter, {}).update(values)
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in rest["param_groups"]
    ]
    set_optimizer_state_dict(
        model, unwrap_optimizer(optimizer), {"state": state, "param_groups": groups}
    )
    return {k.removeprefix(EMA_PREFIX): v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}

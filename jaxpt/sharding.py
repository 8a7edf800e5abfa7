"""Mesh and logical-axis rules: PartitionSpecs for params, optimizer state and batches.

Weights name their logical axes where they are created (``jaxpt.nn.logical_axes``); the rules
table in ``config.mesh.rules`` maps each logical name to mesh axes. Data parallel, FSDP, tensor
and expert parallelism are all just rule tables over the one mesh
``("data", "fsdp", "tensor", "expert")``.

Devices joined by slow links (several TPU slices, or GPU hosts) form a hybrid mesh: ``mesh.data``
and friends are the sizes within one slice, ``mesh.dcn_data`` and ``mesh.dcn_fsdp`` how many
slices the data and FSDP axes span; each axis of the mesh is the product of the two.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import jax
import ml_collections
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpt import nn
from jaxpt.errors import ConfigError, check_range

MESH_AXES = ("data", "fsdp", "tensor", "expert")
# The config.mesh fields that say how many slices an axis spans (tensor and expert: one)
DCN_FIELDS = {"data": "dcn_data", "fsdp": "dcn_fsdp"}
# A tensor this large (elements) that stays replicated over a mesh axis its rules name is
# reported: it costs that axis's memory saving, and usually the size is one padding away.
LARGE_TENSOR = 1 << 20
MeshAxes = tuple[str, ...]


def default_rules() -> ml_collections.ConfigDict:
    """Logical name -> mesh axes (a tuple; empty = replicated).

    FSDP splits the first dimension of each weight whose rule names fsdp (``spec_for``): the
    table's rows (``vocab``), the output projections' inputs (``mlp``, ``q_heads``), the other
    matrices' ``embed``. NCCL gathers and scatters along the first dimension; split along the
    last, a weight made the optimizer's update transpose it and its moments
    (``bench/README.md``, FSDP).
    """
    return ml_collections.ConfigDict(
        dict(
            batch=("data", "fsdp", "expert"),  # activations and input batches
            embed=("fsdp",),
            mlp=("tensor", "fsdp"),
            q_heads=("tensor", "fsdp"),
            kv_heads=("tensor",),
            vocab=("tensor", "fsdp"),
            expert=("expert",),
            layers=(),
            norm=(),
        )
    )


def moment_rules(rules, shard_optimizer: bool):
    """The rules of the optimizer moments: the params' own, or with ``shard_optimizer``
    (ZeRO-1) the data axis after fsdp in every rule that names fsdp but not data: the moments
    split as the params would be by an fsdp axis of fsdp x data devices (``spec_for``: a
    dimension takes data where its size divides by it too)."""
    if not shard_optimizer:
        return rules
    return {name: _data_after_fsdp(axes) for name, axes in dict(rules).items()}


def _data_after_fsdp(axes: MeshAxes) -> MeshAxes:
    if "fsdp" not in axes or "data" in axes:
        return tuple(axes)
    at = axes.index("fsdp") + 1
    return (*axes[:at], "data", *axes[at:])


def validate_mesh(mesh_cfg) -> None:
    """Raises ConfigError naming the first ``config.mesh`` field that breaks a rule: sizes are
    positive or -1 (the devices left over, on one axis at most), slice counts positive,
    ``shard_optimizer`` a bool, and rules name mesh axes, each at most once."""
    for axis in MESH_AXES:
        size = mesh_cfg[axis]
        if size != -1:
            check_range(f"mesh.{axis}", size, at_least=1, integer=True, note=", or -1 (the rest)")
    for field in DCN_FIELDS.values():
        if mesh_cfg[field] != -1:
            check_range(f"mesh.{field}", mesh_cfg[field], at_least=1, integer=True, note=", or -1")
    _at_most_one_rest(
        [f"mesh.{axis}" for axis in MESH_AXES if mesh_cfg[axis] == -1], "devices", "mesh.data"
    )
    _at_most_one_rest(
        [f"mesh.{f}" for f in DCN_FIELDS.values() if mesh_cfg[f] == -1], "slices", "mesh.dcn_data"
    )
    if not isinstance(mesh_cfg.shard_optimizer, bool):
        raise ConfigError(
            f"mesh.shard_optimizer={mesh_cfg.shard_optimizer!r} must be True or False."
        )
    for name, axes in mesh_cfg.rules.items():
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ConfigError(
                f"mesh.rules.{name}={tuple(axes)!r} names {unknown[0]!r}, not one of the mesh "
                f"axes {list(MESH_AXES)}{_several_axes_syntax(name, axes)}."
            )
        repeated = [a for i, a in enumerate(axes) if a in axes[:i]]
        if repeated:  # a PartitionSpec splits a dimension over each mesh axis once
            raise ConfigError(
                f"mesh.rules.{name}={tuple(axes)!r} names {repeated[0]!r} twice; name each mesh "
                "axis once."
            )


def _several_axes_syntax(rule: str, axes) -> str:
    """For a rule whose axis names hold commas (``--config.mesh.rules.batch=data,fsdp`` is the
    one-name tuple ``('data,fsdp',)``), the end of a sentence showing the flag that names
    them; else nothing."""
    listed = [axis for axis in axes if isinstance(axis, str)]  # a flag can give (1,), (None,)
    if not any("," in axis for axis in listed):
        return ""
    names = tuple(name.strip() for axis in listed for name in axis.split(","))
    return f'; to name several axes, pass a tuple: --config.mesh.rules.{rule}="{names!r}"'


def _at_most_one_rest(fields: list[str], what: str, default: str) -> None:
    """ConfigError when more than one of ``fields`` (e.g. ``["mesh.data", "mesh.fsdp"]``) is
    -1, showing the sizes that leave the last of them the rest: ``default``, the field that is
    -1 by default, is -1 in a run given only ``--config.mesh.fsdp=-1`` too."""
    if len(fields) > 1:
        sizes = " and ".join(f"{field}=1" for field in fields[:-1])
        why = f" ({default} is -1 by default)" if default in fields else ""
        raise ConfigError(
            f"{' and '.join(fields)} are all -1{why}, but at most one takes the {what} left "
            f"over; set {sizes} (or another size) to give {fields[-1]} the rest."
        )


def mesh_shape(mesh_cfg, n_devices: int, *, n_slices: int = 1) -> tuple[int, ...]:
    """Sizes of MESH_AXES within one of ``n_slices`` slices of ``n_devices // n_slices``
    devices each; one size may be -1 (the devices left over)."""
    validate_mesh(mesh_cfg)
    per_slice = n_devices // n_slices
    where = f"the {per_slice} devices" + (" of each slice" if n_slices > 1 else "")
    sizes = [mesh_cfg[axis] for axis in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per_slice % fixed:
            named = " x ".join(
                f"mesh.{axis}={size}"
                for axis, size in zip(MESH_AXES, sizes, strict=True)
                if size > 1
            )
            raise ConfigError(
                f"{named} (the sizes other than -1) multiply to {fixed}, which does not divide "
                f"{where}; make their product a divisor of {per_slice}."
            )
        sizes[sizes.index(-1)] = per_slice // fixed
    if math.prod(sizes) != per_slice:
        raise ConfigError(
            f"The mesh {dict(zip(MESH_AXES, sizes, strict=True))} has "
            f"{math.prod(sizes)} slots for {where}; make the product "
            "of mesh.data, mesh.fsdp, mesh.tensor and mesh.expert equal it."
        )
    return tuple(sizes)


def _process_is_slice(devices: Sequence[jax.Device]) -> bool:
    # TPU and GPU devices carry their slice (``slice_index``: a TPU slice, a GPU host). On CPU
    # each process stands for a host: the CPU client names no slice in one process and puts
    # every process of a machine in slice 0, so two CPU processes can rehearse two hosts.
    return devices[0].platform == "cpu"


def slices(devices: Sequence[jax.Device]) -> list[list[jax.Device]]:
    """``devices`` grouped by the slow links between them, in slice (CPU: process) order."""
    groups: dict[int, list[jax.Device]] = {}
    for device in devices:
        key = device.process_index if _process_is_slice(devices) else device.slice_index
        groups.setdefault(key, []).append(device)
    return [groups[key] for key in sorted(groups)]


def dcn_shape(mesh_cfg, groups: list[list[jax.Device]]) -> tuple[int, ...]:
    """How many of the slices ``groups`` (``slices(devices)``) each of MESH_AXES spans;
    ``mesh.dcn_data`` or ``mesh.dcn_fsdp`` at -1 takes the slices the other leaves (the
    default: the data axis spans them all). Raises ConfigError unless the counts multiply to
    the number of slices and every slice holds as many devices."""
    validate_mesh(mesh_cfg)
    kinds = "processes" if _process_is_slice(groups[0]) else "slices (TPU slices or GPU hosts)"
    n_devices, n = sum(map(len, groups)), len(groups)
    counts = {axis: mesh_cfg[field] for axis, field in DCN_FIELDS.items()}
    fixed = math.prod(c for c in counts.values() if c != -1)
    rest = [axis for axis, c in counts.items() if c == -1]
    if rest and n % fixed == 0:
        counts[rest[0]] = n // fixed
    if math.prod(counts.values()) != n:
        given = " x ".join(f"mesh.{field}={mesh_cfg[field]}" for field in DCN_FIELDS.values())
        raise ConfigError(
            f"{given} must equal the number of {kinds} the {n_devices} devices are in ({n}); "
            "set mesh.dcn_data=-1 (and mesh.dcn_fsdp=1) to put the slow links between them "
            "on the data axis."
        )
    sizes = sorted({len(group) for group in groups})
    if len(sizes) > 1:
        raise ConfigError(
            f"The {n_devices} devices are in {kinds} of unequal sizes {sizes}; a mesh needs "
            "the same number of devices in each."
        )
    return tuple(counts.get(axis, 1) for axis in MESH_AXES)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The device mesh described by ``config.mesh`` over ``devices`` (default: all): within
    each slice ``jax.make_mesh``'s layout; across slices the data and FSDP axes, as
    ``mesh.dcn_data`` and ``mesh.dcn_fsdp`` say."""
    devices = jax.devices() if devices is None else devices
    groups = slices(devices)
    dcn = dcn_shape(mesh_cfg, groups)
    shape = mesh_shape(mesh_cfg, len(devices), n_slices=len(groups))
    # Auto axes: shardings come from the rules and the compiler, as jit's in/out_shardings say
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if len(groups) == 1:
        return jax.make_mesh(shape, MESH_AXES, auto, devices=devices)
    grid = mesh_utils.create_hybrid_device_mesh(
        shape, dcn, devices, process_is_granule=_process_is_slice(devices)
    )
    return Mesh(grid, MESH_AXES, axis_types=auto)


def _placements(shape, axes, mesh: Mesh, rules) -> Iterator[tuple[MeshAxes, MeshAxes]]:
    """Per dimension: the mesh axes its logical name's rule offers it (those of size > 1 that no
    earlier dimension took) and those it takes: in the rule's order, each one by which the
    dimension's size still divides, together with those taken before it."""
    used: set[str] = set()
    for size, name in zip(shape, axes, strict=True):
        offered = tuple(
            a for a in (rules.get(name, ()) if name else ()) if mesh.shape[a] > 1 and a not in used
        )
        taken: MeshAxes = ()
        for axis in offered:
            if size % math.prod(mesh.shape[a] for a in (*taken, axis)) == 0:
                taken = (*taken, axis)
        used.update(taken)
        yield offered, taken


def spec_for(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh, rules) -> P:
    """The PartitionSpec of one array from its logical axes.

    A dimension is split over the mesh axes its rule names, in order, but for those an earlier
    dimension already took and those its size does not divide by (with the ones before them):
    the table ``(50304, 768)``, ``('vocab', 'embed')``, under ``vocab=('tensor', 'fsdp')``
    and ``embed=('fsdp',)`` is ``P(('tensor', 'fsdp'), None)``; ``(50257, 768)`` is
    ``P(None, 'fsdp')``.
    """
    return P(
        *(
            (taken[0] if len(taken) == 1 else taken) if taken else None
            for _, taken in _placements(shape, axes, mesh, rules)
        )
    )


def param_shardings(params, mesh: Mesh, rules):
    """NamedShardings for every array of ``params`` (abstract shapes are fine)."""
    return jax.tree.map(
        lambda x, axes: NamedSharding(mesh, spec_for(x.shape, axes, mesh, rules)),
        params,
        nn.logical_axes(params),
    )


def moment_shardings(params, mesh: Mesh, rules, *, shard_optimizer: bool):
    """NamedShardings for the optimizer moments of every array of ``params``: the params', or
    with ``shard_optimizer`` (ZeRO-1) those ``moment_rules`` give, split over the data axis
    too."""
    return param_shardings(params, mesh, moment_rules(rules, shard_optimizer))


def _taken(spec: P) -> set[str]:
    """The mesh axes ``spec`` splits some dimension over."""
    return set(jax.tree.leaves(tuple(spec)))


def _named_arrays(params) -> list[tuple[str, jax.Array, nn.Axes]]:
    """``(path, array, logical axes)`` of every array of ``params``, e.g.
    ``("blocks.0.attn.q.weight", ...)``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [
        (jax.tree_util.keystr(path, simple=True, separator="."), array, axes)
        for (path, array), axes in zip(flat, jax.tree.leaves(nn.logical_axes(params)), strict=True)
    ]


def describe_mesh(mesh: Mesh) -> str:
    """``mesh (data=4, fsdp=1, tensor=1, expert=1) over 4 NVIDIA H200 devices``: its axes'
    sizes and its devices' kind (``jax.Device.device_kind``; ``cpu`` on a CPU)."""
    sizes = ", ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
    return f"mesh ({sizes}) over {mesh.devices.size} {mesh.devices.flat[0].device_kind} devices"


def describe_shardings(params, mesh: Mesh, rules, *, shard_optimizer: bool = False) -> str:
    """The mesh, then one line per array of ``params``: its path, shape, logical axes and
    resolved PartitionSpec (abstract shapes are fine); with ``shard_optimizer`` (ZeRO-1) also
    its optimizer moments' PartitionSpec (``moment_shardings``). Each column is as wide as
    its longest entry."""
    what = "param shardings" + (", then their optimizer moments'" if shard_optimizer else "")
    rows = []
    for path, array, axes in _named_arrays(params):
        specs = [spec_for(array.shape, axes, mesh, rules)]
        if shard_optimizer:
            specs.append(spec_for(array.shape, axes, mesh, moment_rules(rules, True)))
        rows.append([path, str(array.shape), str(tuple(axes)), *map(str, specs)])
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    lines = [f"{describe_mesh(mesh)}; {what}:"]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def replication_warnings(
    params, mesh: Mesh, rules, *, shard_optimizer: bool = False, min_size: int = LARGE_TENSOR
) -> list[str]:
    """One sentence for each array of at least ``min_size`` elements that stays replicated
    over mesh axes its rules name because its size there does not divide by theirs; with
    ``shard_optimizer``, also for each whose optimizer moments stay whole over the axes
    ZeRO-1 adds (``moment_rules``) for that reason."""
    warnings = []
    zero_rules = moment_rules(rules, shard_optimizer)
    for path, array, axes in _named_arrays(params):
        if array.size < min_size:
            continue
        shape = tuple(array.shape)
        for dim, missed, n in _unsplit(shape, axes, mesh, rules):
            warnings.append(_replicated(f"{path} {shape} stays", axes[dim], dim, missed, n, shape))
        for dim, missed, n in _unsplit(shape, axes, mesh, zero_rules):
            if added := [a for a in missed if a not in rules.get(axes[dim], ())]:
                subject = f"{path} {shape} keeps its optimizer moments (mesh.shard_optimizer)"
                warnings.append(_replicated(subject, axes[dim], dim, added, n, shape))
    return warnings


def _unsplit(shape, axes, mesh: Mesh, rules) -> Iterator[tuple[int, list[str], int]]:
    """``(dimension, mesh axes, n)``: the mesh axes that rules offer an array's dimensions but
    no dimension takes, because no size divides by them, each with the first dimension that
    was offered it, and n the size that dimension would have to divide by (with the axes it
    takes)."""
    unused = set(MESH_AXES) - _taken(spec_for(shape, axes, mesh, rules))
    for dim, (offered, taken) in enumerate(_placements(shape, axes, mesh, rules)):
        if missed := [a for a in offered if a in unused]:
            unused -= set(missed)
            yield dim, missed, math.prod(mesh.shape[a] for a in (*taken, *missed))


def _replicated(subject: str, name: str, dim: int, missed: list[str], n: int, shape) -> str:
    return (
        f"{subject} replicated over mesh axis {' x '.join(map(repr, missed))}: its dimension "
        f"{dim} ({name!r}, {shape[dim]}) does not divide by {n}; make it a multiple of {n} or "
        f"change mesh.rules.{name}."
    )


def attention_warnings(n_head: int, n_kv_head: int, mesh: Mesh, rules) -> list[str]:
    """One sentence when a head count does not divide by the mesh axes of its rule
    (``q_heads`` for ``n_head``, ``kv_heads`` for ``n_kv_head``) that the batch's leaves it
    (attention's activations are ``(B, T, heads, Dh)``, and B takes the batch's axes first):
    the q, k, v and output weights, stored flat as ``(D, heads x Dh)``, then split part-way
    through a head, and every device computes all those heads (results are right; attention
    gets no tensor parallelism). Under cuDNN attention, whose q, k and v are sharded alike,
    unsplit key/value heads leave every query head whole on every device too.
    """
    fields = {"q_heads": ("n_head", n_head), "kv_heads": ("n_kv_head", n_kv_head)}
    batch = batch_axes(mesh, rules)
    heads_rules = {name: tuple(a for a in rules[name] if a not in batch) for name in fields}
    placed = {  # name -> (the mesh axes offered, those the count divides by)
        name: next(_placements((count,), (name,), mesh, heads_rules))
        for name, (_, count) in fields.items()
    }
    unsplit = [name for name, (offered, taken) in placed.items() if taken != offered]
    if not unsplit:
        return []
    offered, taken = placed[unsplit[0]]
    missed = [a for a in offered if a not in taken]
    n = math.prod(mesh.shape[a] for a in offered)
    named = " and ".join("model.{}={}".format(*fields[name]) for name in unsplit)
    heads = "head" if "q_heads" in unsplit else "key/value head (under cuDNN attention, every head)"
    return [
        f"Attention is not split over mesh axis {' x '.join(map(repr, missed))}: {named} "
        f"{'do' if len(unsplit) > 1 else 'does'} not divide by {n}, so every device computes "
        f"every {heads} and the weights split part-way through one; choose "
        f"{' x '.join(f'mesh.{a}' for a in offered)} dividing model.n_kv_head={n_kv_head}, "
        f"or change mesh.rules.{' and mesh.rules.'.join(unsplit)}."
    ]


def batch_axes(mesh: Mesh, rules) -> tuple[str, ...]:
    """Mesh axes that split the batch dimension (those of size > 1)."""
    return tuple(a for a in rules["batch"] if mesh.shape[a] > 1)


def batch_shards(mesh: Mesh, rules) -> int:
    """How many parts the batch dimension is split into (the product of ``batch_axes``)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Batches ``(B, ...)`` split over the batch axes, replicated along the rest."""
    return NamedSharding(mesh, P(batch_axes(mesh, rules) or None, *([None] * (ndim - 1))))


def activation_rules(rules) -> dict[str, MeshAxes]:
    """The rules activations are pinned by: the data and fsdp axes split only their batch, so
    a weight a layer pins for its use (the token table's ``('vocab', None)``) is gathered
    over them, as FSDP gathers a weight for its matmul."""
    return {
        name: tuple(a for a in axes if name == "batch" or a not in ("data", "fsdp"))
        for name, axes in dict(rules).items()
    }


def activation_sharding(mesh: Mesh, rules):
    """A context in which layers pin the activations they name (``nn.constrain``) to the
    sharding ``activation_rules`` give their logical axes. Enter it around the first call of a
    jitted step (that is when it is traced)."""
    resolved = activation_rules(rules)
    return nn.shard_activations(
        lambda shape, names: NamedSharding(mesh, spec_for(shape, names, mesh, resolved))
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())

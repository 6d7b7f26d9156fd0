"""How the world is cut into the four parallel dimensions, and the one named DeviceMesh.

The mesh follows the Llama 3 paper's order [TP, CP, PP, DP] from the innermost (fastest,
most bandwidth-hungry) dimension outwards, so on a real cluster tensor parallelism stays
inside a node and data parallelism spans nodes. Data parallelism is split into
`dp_replicate` (HSDP's replica groups, outermost) and `dp_shard` (FSDP's shard group).

Trade-off: every dimension is kept in the mesh, even of size 1, so code can always ask for
`mesh["cp"]` without branching; size-1 groups cost a few milliseconds at start-up. The
flattened meshes FSDP and the loss need are built once here and kept in `Meshes`, because
slicing flattened dimensions out of the root mesh is deprecated in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# Outermost first; see the module docstring for why DP is outside PP.
MESH_DIMS = ("dp_replicate", "dp_shard", "pp", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each parallel dimension. `dp_shard=-1` takes whatever the others leave."""

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "cp", "tp", "pp", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        others = self.dp_replicate * self.cp * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % others != 0:
                raise ValueError(
                    f"world size {self.world_size} is not divisible by dp_replicate*cp*tp*pp = {others}; "
                    f"choose degrees whose product divides the number of processes, or launch a multiple of "
                    f"{others} (torchrun --nproc-per-node {others})"
                )
            object.__setattr__(self, "dp_shard", self.world_size // others)
        elif self.dp_shard < 1:
            raise ValueError(f"parallel.dp_shard must be >= 1 or -1 (use the remaining ranks), got {self.dp_shard}")
        product = others * self.dp_shard
        if product != self.world_size:
            raise ValueError(
                f"dp_replicate*dp_shard*cp*tp*pp = {self.dp_replicate}*{self.dp_shard}*{self.cp}*{self.tp}*{self.pp}"
                f" = {product}, but the world size is {self.world_size}; change the degrees or launch "
                f"{product} processes (torchrun --nproc-per-node {product})"
            )

    @property
    def dp(self) -> int:
        """Ranks that read different data: replicas times shards."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> int:
        """Ranks that share one FSDP shard group: CP ranks hold the same weights, so they shard too."""
        return self.dp_shard * self.cp

    @property
    def enabled(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_DIMS if getattr(self, name) > 1}

    def describe(self) -> str:
        return " x ".join(f"{k}{v}" for k, v in self.enabled.items()) or "single process"

    def build_mesh(self, device_type: str = "cpu") -> Meshes:
        """Create the world mesh (needs an initialised default process group)."""
        world = init_device_mesh(device_type, tuple(getattr(self, n) for n in MESH_DIMS), mesh_dim_names=MESH_DIMS)
        dp = world["dp_replicate", "dp_shard"]._flatten("dp")
        # The loss and gradient average run over every rank that sees different tokens.
        dp_cp = world["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        fsdp = world["dp_shard", "cp"]._flatten("dp_shard_cp")
        if self.dp_replicate > 1:
            # HSDP needs a 2-D (replicate, shard) mesh; carve it out of the flattened dp_cp mesh.
            fsdp = dp_cp._unflatten(0, (self.dp_replicate, self.fsdp), ("dp_replicate", "dp_shard_cp"))
        return Meshes(dims=self, world=world, dp=dp, dp_cp=dp_cp, fsdp=fsdp,
                      cp=world["cp"], tp=world["tp"], pp=world["pp"])


@dataclass
class Meshes:
    """The world mesh and the sub-meshes each parallelism applies to."""

    dims: ParallelDims
    world: DeviceMesh
    dp: DeviceMesh  # data loading: dp_rank / dp_world
    dp_cp: DeviceMesh  # loss normalisation: all ranks with distinct tokens
    fsdp: DeviceMesh  # 1-D (dp_shard_cp) or 2-D (dp_replicate, dp_shard_cp) for HSDP
    cp: DeviceMesh
    tp: DeviceMesh
    pp: DeviceMesh

    @property
    def dp_rank(self) -> int:
        return self.dp.get_local_rank()

    @property
    def dp_world(self) -> int:
        return self.dp.size()

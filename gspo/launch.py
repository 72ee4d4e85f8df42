"""How many processes this launch started: what any launcher (torchrun, accelerate launch, mpirun) tells each
process through its environment, read before anything distributed is initialised.

accelerate's own count (`Accelerator().num_processes`) is not enough: on a machine without CUDA it only counts
processes when it was told to use the CPU, so under `torchrun --nproc_per_node 2` each process saw 1 and the
two ran the whole job independently into the same output_dir.
"""

from __future__ import annotations

import os

# The variables launchers set, in the order accelerate's PartialState reads them (torchrun and
# `accelerate launch` set WORLD_SIZE; MPI launchers the others).
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launch_processes() -> tuple[int, str | None]:
    """(number of processes of this launch, the variable that said so); (1, None) when not launched by one.
    A value that is not a positive integer counts as unset."""
    for var in WORLD_SIZE_VARS:
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value), var
    return 1, None


RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def launch_rank() -> int:
    """This process's rank in the launch (0 when not launched by one): rank 0 alone claims the output folder
    and prints."""
    for var in RANK_VARS:
        value = os.environ.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def process_count_problem(stage: str, max_processes: int | None) -> str | None:
    """One line when this launch has more processes than stage `stage` runs on (`max_processes`; None: any)."""
    n, var = launch_processes()
    if max_processes is None or n <= max_processes:
        return None
    return (f"the {stage} stage runs on {max_processes} process(es) but this launch started {n} ({var}={n}, "
            f"set by torchrun / accelerate launch / mpirun): every process would run the whole job into the "
            f"same output_dir; launch it as one process (`gspo train ...`, or --nproc_per_node 1 / "
            f"--num_processes 1)")

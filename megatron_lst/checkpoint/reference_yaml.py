"""YAML read as the reference reads its training configs (`neillu23/lst`, through OmegaConf).

PyYAML's safe loader follows YAML 1.1, where a number written with an exponent but without a
point or without a signed exponent (`1e-6`, `5e5`, `1.0e5`) is a string; OmegaConf's loader,
which the reference's `config_parser` loads every config with, reads it as a float, so a
`norm_eps: 1e-6` or `rope_theta: 5e5` there is that number to the reference and must be here.
OmegaConf's loader also refuses a mapping that gives a key twice (PyYAML keeps the last), as
uncommenting the "changed parameters" block of the reference's `lst/configs/lst.yaml` does: no
reference run was launched from such a file, so it is refused here too, naming the key.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class ReferenceYamlLoader(yaml.SafeLoader):
    """The safe loader, plus the floats with an exponent that YAML 1.1 leaves strings, refusing
    a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r} is given twice in one mapping, which "
                    "the reference's config loader (OmegaConf) refuses; keep one",
                    key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


# A decimal (digits with an optional point and fraction, or a point and fraction) followed by an
# exponent with or without its sign; underscores between digits as YAML 1.1 allows them.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
ReferenceYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT,
                                          list("-+0123456789."))


def load_reference_yaml(text: str) -> Any:
    """The document in `text` as the reference reads it (`ReferenceYamlLoader`)."""
    return yaml.load(text, Loader=ReferenceYamlLoader)

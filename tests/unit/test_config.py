"""herd.config, the one loader: typed building, tagged lists, dict-level overrides, TOML out.

Training's and the data pipeline's own tests cover their files; these check the loader's rules on
small classes, with Python's TOML reader (tomllib) as the reference for what `to_toml` writes.
"""

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from herd.config import apply_overrides, build, describe_sections, override_data, tagged_entries, to_toml


@dataclass
class Circle:
    kind: ClassVar[str] = "circle"
    name: str = ""
    radius: float = 1.0
    tags: dict[str, Any] | None = None
    scale: float | None = 1.0


@dataclass
class Label:
    text: str  # required
    name: str = ""
    at: str | list[str] = "center"
    hook: Callable[[str], str] | None = None  # set from Python only: not a key


SHAPES = {"circle": Circle, "label": Label}


def _no_tags_on_labels(cls):
    return {"tags": "labels have no tags"} if cls is Label else {}


@dataclass
class Section:
    size: int = 3
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class Doc:
    title: str
    section: Section = field(default_factory=Section)
    shape: list[Any] = tagged_entries(SHAPES, what="[[shape]]", exclude=_no_tags_on_labels)


def test_tagged_entries_pick_their_class_and_name_defaults_to_the_type():
    doc = build(Doc, {"title": "t", "shape": [{"type": "circle", "radius": 2}, {"type": "label", "text": "hi",
                                                                                 "at": ["a", "b"]}]})
    assert doc.shape == [Circle(name="circle", radius=2.0), Label(text="hi", name="label", at=["a", "b"])]
    assert isinstance(doc.shape[0].radius, float)


@pytest.mark.parametrize("data, message", [
    ({"title": "t", "shape": [{"type": "circle", "radius": "big"}]}, "shape[0].radius: expected a number, got 'big'"),
    ({"title": "t", "shape": [{"type": "circle"}, {"type": "label"}]}, 'missing required key shape[1].text in [[shape]] '
     'of type "label"'),
    ({"title": "t", "shape": [{"type": "label", "text": "x", "hook": "f"}]}, "unknown key shape[0].hook"),
    ({"title": "t", "shape": [{"type": "label", "text": "x", "tags": {}}]}, "shape[0].tags: labels have no tags"),
    ({"title": "t", "shape": [{"type": "square"}]}, "shape[0]: unknown or missing type 'square' in [[shape]]; "
     "choose one of circle, label"),
    ({"title": "t", "shape": {"type": "circle"}}, "shape: expected a list of tables ([[shape]]), got dict"),
    ({"title": "t", "shape": [{"type": "label", "text": "x", "at": 3}]}, "shape[0].at: expected str or list of str"),
    ({"title": "t", "section": {"weights": {"a": "x"}}}, "section.weights.a: expected a number, got 'x'"),
    ({"title": "t", "section": {"weights": [1.0]}}, "section.weights: expected a table"),
    ({}, "missing required key title in the top level"),
])
def test_errors_name_the_key_path(data, message):
    with pytest.raises(ValueError) as e:
        build(Doc, data)
    assert message in str(e.value)


def test_overrides_reach_sections_and_entries_by_name_or_index():
    data = {"title": "t", "shape": [{"type": "circle", "name": "c1"}, {"type": "label", "text": "x"}]}
    out = apply_overrides(Doc, data, ["--section.size", "5", "--shape.c1.radius", "2.5", "--shape.1.at", '["a", "b"]',
                                      "--shape.label.text=y", "--section.weights", "{web = 1}"])
    assert data["shape"][0] == {"type": "circle", "name": "c1"}  # the input is left as it was
    doc = build(Doc, out)
    assert doc.section == Section(size=5, weights={"web": 1.0})
    assert doc.shape == [Circle(name="c1", radius=2.5), Label(text="y", name="label", at=["a", "b"])]
    with pytest.raises(ValueError, match="--shape.label.tags: labels have no tags"):
        apply_overrides(Doc, data, ["--shape.label.tags", "{a = 1}"])
    with pytest.raises(ValueError, match="unknown key 'hook'; valid keys: text, name, at$"):
        apply_overrides(Doc, data, ["--shape.label.hook", "f"])
    # "none" unsets a key whose default is unset; one with a real default cannot be unset (TOML has no null)
    assert "tags" not in apply_overrides(Doc, {**data, "shape": [{"type": "circle", "tags": {}}]},
                                         ["--shape.0.tags", "none"])["shape"][0]
    with pytest.raises(ValueError, match="--shape.c1.scale: cannot be unset from the command line"):
        apply_overrides(Doc, data, ["--shape.c1.scale", "none"])
    with pytest.raises(ValueError, match="--section is a section; override one of its keys"):
        override_data(Doc, data, "section", "3")
    with pytest.raises(ValueError, match="--shape.c1.radius.x: a list entry's key is overridden as --shape.NAME.KEY"):
        apply_overrides(Doc, data, ["--shape.c1.radius.x", "3"])


@pytest.mark.parametrize("text", ['plain', 'quo"te', "back\\slash", "new\nline\ttab", "bell\x07", "ünï €", ""])
def test_to_toml_writes_what_tomllib_reads_back(text):
    doc = Doc(title=text, section=Section(weights={text or "k": 0.5, "a.b c": 1e-9, "inf": float("inf")}),
              shape=[Circle(name=text, tags={"x y": [text, 1, True]}), Label(text=text, name="l", at=[text])])
    printed = to_toml(doc)
    assert build(Doc, tomllib.loads(printed)) == doc
    assert tomllib.loads(printed)["shape"][0]["type"] == "circle"  # tagged entries carry their type


def test_describe_sections_shows_required_keys_and_each_types_keys():
    text = describe_sections(Doc)
    assert "[section]\n  size = 3  (int)\n  weights = {}  (table of float)" in text
    assert '  type = "circle": name, radius, tags, scale' in text and '  type = "label": text, name, at' in text

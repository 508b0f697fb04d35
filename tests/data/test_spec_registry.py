"""The data spec registry: one registered opener is a dataset everywhere (open_dataset, errors, --data help)."""

from __future__ import annotations

import pytest

from medssl.cli import build_parser
from medssl.data.phantoms import PhantomDataset
from medssl.data.specs import SPECS, open_dataset, register_spec, spec_help, valid_specs
from medssl.errors import DataError


@pytest.fixture
def temporary():
    names: list[str] = []
    yield names
    for n in names:
        SPECS.pop(n, None)


def _data_help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return next(a for a in sub._actions if "--data" in a.option_strings).help


def test_every_builtin_spec_is_in_the_help_and_the_error_list():
    assert list(SPECS) == ["phantom2d", "phantom3d", "npz", "folder", "csv", "volumes", "isic2017", "cbis-ddsm",
                           "medmnist", "shards"]
    help_text = spec_help()
    for entry in SPECS.values():
        assert f"'{entry.syntax}' ({entry.help})" in help_text
        assert entry.syntax in valid_specs()
    assert {n for n, e in SPECS.items() if e.takes_intensity} == {"csv", "volumes", "cbis-ddsm"}
    with pytest.raises(DataError) as e:
        open_dataset("nosuch:thing")
    assert valid_specs() in str(e.value)


def test_a_registered_spec_opens_and_appears_everywhere(temporary):
    calls = []

    @register_spec("tinyphantom", syntax="tinyphantom[:N]", help="eight phantoms, for this test")
    def _open(spec, arg, image_size, task, seed):
        calls.append((spec, arg, image_size, task, seed))
        return PhantomDataset("phantom2d", n=int(arg or 8), image_size=image_size, task=task, seed=seed, name=spec)

    temporary.append("tinyphantom")
    ds = open_dataset("TinyPhantom:4", image_size=16, seed=3)
    assert len(ds) == 4 and calls == [("TinyPhantom:4", "4", 16, None, 3)]
    assert "'tinyphantom[:N]' (eight phantoms, for this test)" in spec_help()
    assert "tinyphantom[:N]" in _data_help("evaluate") and "tinyphantom[:N]" in _data_help("pretrain")
    with pytest.raises(DataError, match="tinyphantom"):
        open_dataset("unknown:x")


def test_intensity_reaches_only_openers_that_take_it(temporary):
    got = {}

    @register_spec("withintensity", takes_intensity=True, help="x")
    def _with(spec, arg, image_size, task, seed, intensity=None):
        got["with"] = intensity
        return PhantomDataset("phantom2d", n=4, name=spec)

    @register_spec("without", help="y")
    def _without(spec, arg, image_size, task, seed):
        got["without"] = True
        return PhantomDataset("phantom2d", n=4, name=spec)

    temporary += ["withintensity", "without"]
    marker = object()
    open_dataset("withintensity:a", intensity=marker)
    open_dataset("without:b", intensity=marker)
    assert got == {"with": marker, "without": True}
    assert SPECS["withintensity"].syntax == "withintensity:PATH"


def test_bad_registrations_fail():
    with pytest.raises(DataError, match="already registered"):
        register_spec("npz", help="again")(lambda *a: None)
    for bad in ("", "Upper", "with:colon"):
        with pytest.raises(DataError, match="prefix"):
            register_spec(bad, help="x")

"""The one test-asset locator: FTCORE_TEST_ASSETS when set, else the assets packaged with ftcore."""

import json

import pytest
from ftcore.testing import ASSETS_ENV, PACKAGED_ASSETS, MissingAssets, asset, assets_dir, stories_model


def test_the_variable_names_the_assets_folder(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text("{}\n")
    monkeypatch.setenv(ASSETS_ENV, str(tmp_path))
    assert assets_dir() == tmp_path.resolve()
    assert asset("data/rows.jsonl") == tmp_path.resolve() / "data" / "rows.jsonl"
    with pytest.raises(MissingAssets, match=r"test asset 'models/stories260K-hf' missing under "):
        stories_model()


def test_a_wrong_variable_fails_clearly_instead_of_falling_back(tmp_path, monkeypatch):
    monkeypatch.setenv(ASSETS_ENV, str(tmp_path / "nope"))
    with pytest.raises(
        MissingAssets, match=rf"test assets not found \(tried {tmp_path / 'nope'}\)\. Set {ASSETS_ENV}"
    ):
        assets_dir()


def test_without_the_variable_the_packaged_assets_are_used(monkeypatch):
    monkeypatch.delenv(ASSETS_ENV, raising=False)
    assert assets_dir() == PACKAGED_ASSETS
    assert (stories_model() / "model.safetensors").is_file()


def test_every_packaged_file_is_listed_in_the_assets_readme():
    readme = (PACKAGED_ASSETS / "README.md").read_text()
    for path in sorted((PACKAGED_ASSETS / "data").glob("*/*.jsonl")):
        folder, name = path.parent.name, path.name
        assert f"data/{folder}/{name}" in readme or f"data/{folder}/*.jsonl" in readme, path
        for line in path.read_text(encoding="utf-8").splitlines():
            json.loads(line)
    assert "`models/stories260K-hf/`" in readme

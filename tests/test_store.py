"""One result identity and one result store: a result is named before any work, a hit opens no
slide and runs no model, and a slide's bytes are hashed once per file."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from model_export.default_package import build_default_package
from xmag.digest import DigestCache, slide_digest
from xmag.engine import Engine
from xmag.params import SlideOptions
from xmag.results import CASCADE_FILES
from xmag.settings import EngineSettings
from xmag.store import ARTIFACTS, ResultStore, lookup_or_embed

NDPI = "test3-DAPI-2-387.ndpi"  # Hamamatsu, 0.228 um/px: 4 tiles at 5x
DICOM = "BPAEC-dicom"


def _settings() -> EngineSettings:
    return EngineSettings(providers=["cpu"], batch_size=4, reader_workers=2)


@pytest.fixture(scope="module")
def package_dir(default_package: Path) -> Path:
    return default_package


@pytest.fixture
def engine(package_dir: Path) -> Engine:
    return Engine.from_dir(package_dir, _settings())


@pytest.fixture
def slide(slides_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "slides" / NDPI
    copy.parent.mkdir()
    shutil.copyfile(slides_dir / NDPI, copy)
    return copy


def test_a_hit_is_answered_without_opening_the_slide_or_running_the_model(
    engine: Engine, slide: Path, tmp_path: Path
) -> None:
    store = ResultStore(tmp_path / "store")
    digest = slide_digest(slide)
    first = lookup_or_embed(engine, store, slide, digest)
    assert not first.hit and engine.tiles_embedded == first.result.tiles.kept > 0
    assert first.key == first.result.result_key == engine.result_key(digest.sha256)
    assert sorted(p.name for p in first.folder.iterdir()) == sorted(
        set(ARTIFACTS) - set(CASCADE_FILES)  # a package without a cascade writes all the rest
    )
    slide.unlink()  # a hit must not need the slide: only its digest
    second = lookup_or_embed(engine, store, slide, digest)
    assert second.hit and second.key == first.key and second.folder == first.folder
    assert engine.tiles_embedded == first.result.tiles.kept  # nothing ran again
    assert second.result.slide_embedding == first.result.slide_embedding
    assert not (store.root / ".staging").exists() or not any((store.root / ".staging").iterdir())


def test_every_input_of_the_identity_changes_the_key(
    engine: Engine, package_dir: Path, tmp_path: Path
) -> None:
    sha = "ab" * 32
    base = engine.result_key(sha)
    assert engine.result_key(sha, SlideOptions()) == base  # defaults spelt out: same result
    assert engine.result_key("cd" * 32) != base
    assert engine.result_key(sha, SlideOptions(tissue_threshold=0.1)) != base
    assert engine.result_key(sha, SlideOptions(mpp_override=0.25)) != base
    build_default_package(tmp_path / "pkg2", seed=7)
    other = Engine.from_dir(tmp_path / "pkg2", _settings())
    assert other.package.checksums() != engine.package.checksums()
    assert other.result_key(sha) != base


def test_an_option_given_as_the_models_default_is_the_same_result(engine: Engine) -> None:
    sha = "ef" * 32
    default = engine.package.card.tiling_params().tissue_threshold
    assert engine.result_key(sha, SlideOptions(tissue_threshold=default)) == engine.result_key(sha)


def test_a_changed_option_is_computed_and_stored_beside_the_first(
    engine: Engine, slide: Path, tmp_path: Path
) -> None:
    store = ResultStore(tmp_path / "store")
    digest = slide_digest(slide)
    first = lookup_or_embed(engine, store, slide, digest)
    other = lookup_or_embed(
        engine, store, slide, digest, options=SlideOptions(tissue_threshold=0.1)
    )
    assert not other.hit and other.key != first.key
    assert store.lookup(first.key) and store.lookup(other.key)
    assert engine.tiles_embedded == first.result.tiles.kept + other.result.tiles.kept


def test_a_failed_embedding_leaves_no_entry_and_no_staging(engine: Engine, tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "store")
    bad = tmp_path / "not-a-slide.svs"
    bad.write_bytes(b"not a slide at all" * 100)
    from xmag.errors import SlideError

    with pytest.raises(SlideError):
        lookup_or_embed(engine, store, bad, slide_digest(bad))
    assert not [p for p in store.root.rglob("result.json")]
    assert not any((store.root / ".staging").iterdir())


def test_two_processes_publishing_one_key_keep_one_complete_folder(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "store")
    key = "12" * 32
    stagings = []
    for i in range(2):
        staging = store.staging_dir(f"attempt{i}")
        (staging / "features.h5").write_bytes(b"x")
        (staging / "result.json").write_text(f'{{"n": {i}}}')
        stagings.append(staging)
    barrier = threading.Barrier(2)

    def publish(staging: Path) -> None:
        barrier.wait()
        store.publish(staging, key)

    threads = [threading.Thread(target=publish, args=(s,)) for s in stagings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    folder = store.lookup(key)
    assert folder is not None and sorted(p.name for p in folder.iterdir()) == [
        "features.h5",
        "result.json",
    ]
    assert not any(s.exists() for s in stagings)


def test_publishing_a_folder_without_result_json_is_refused(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "store")
    staging = store.staging_dir("half")
    (staging / "features.h5").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"no result\.json"):
        store.publish(staging, "34" * 32)
    assert store.lookup("34" * 32) is None


def test_artifacts_are_only_the_named_files(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "store")
    staging = store.staging_dir()
    (staging / "result.json").write_text("{}")
    (staging / "secret.txt").write_text("no")
    store.publish(staging, "56" * 32)
    assert store.artifact("56" * 32, "result.json") is not None
    assert store.artifact("56" * 32, "secret.txt") is None
    assert store.artifact("56" * 32, "../../etc/passwd") is None
    assert store.artifact("", "result.json") is None


# -- digests ----------------------------------------------------------------------------------
def test_a_path_is_hashed_once_until_its_file_changes(slide: Path, tmp_path: Path) -> None:
    cache = DigestCache(tmp_path / "digests")
    first = cache.digest(slide)
    assert first == slide_digest(slide) and first.size_bytes == slide.stat().st_size
    assert cache.digest(slide) == first
    again = DigestCache(tmp_path / "digests")  # another process sharing the folder
    assert again.digest(slide) == first and (again.hashed, again.reused) == (0, 1)
    assert (cache.hashed, cache.reused) == (1, 1)
    with open(slide, "r+b") as fh:  # rewritten in place: same inode, new bytes and mtime
        fh.seek(1000)
        fh.write(b"\xff\xfe")
    st = slide.stat()
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    changed = cache.digest(slide)
    assert changed != first and changed == slide_digest(slide) and cache.hashed == 2


def test_a_folder_slide_is_hashed_by_names_and_bytes(slides_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / DICOM
    shutil.copytree(slides_dir / DICOM, folder)
    cache = DigestCache(tmp_path / "digests")
    first = cache.digest(folder)
    assert first.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert cache.digest(folder) == first and cache.hashed == 1
    victim = sorted(folder.iterdir())[0]
    victim.rename(folder / ("z" + victim.name))  # same bytes under another name
    assert cache.digest(folder) != first and cache.hashed == 2


def test_a_corrupt_digest_entry_is_hashed_again(slide: Path, tmp_path: Path) -> None:
    cache = DigestCache(tmp_path / "digests")
    first = cache.digest(slide)
    for entry in (tmp_path / "digests").rglob("*.json"):
        entry.write_text("{not json")
    assert cache.digest(slide) == first and cache.hashed == 2


def test_the_result_names_its_files_as_the_store_lists_them() -> None:
    from xmag.results import Artifacts

    names = (
        Artifacts(heatmap_values="x", cells="cells.geojson", cascade_heatmap="cascade_heatmap.png")
        .model_dump(exclude={"heatmap_values"})
        .values()
    )
    assert set(names) | {"result.json"} == set(ARTIFACTS)

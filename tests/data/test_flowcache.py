"""The flow-cache exchange format: round trips and every refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from mer.data.databases.flowcache import (
    FlowCacheError,
    image_name,
    read_flowcache,
    write_flowcache,
)
from mer.data.samples import FlowSamples


def make_samples(subjects=("006", "007", "sub01"), per=2, database="samm", size=28,
                 seed=0, synthetic=False) -> FlowSamples:
    rng = np.random.default_rng(seed)
    rows = [{"database": database, "subject": s, "clip": f"{s}_{k}_{j}", "label": (k + j) % 3,
             "emotion": ["anger", "happiness", "surprise"][(k + j) % 3]}
            for k, s in enumerate(subjects) for j in range(per)]
    x = rng.random((len(rows), 3, size, size)).astype(np.float32)
    return FlowSamples(x=x, meta=pd.DataFrame(rows), class_names=["negative", "positive",
                                                                   "surprise"],
                       synthetic=synthetic)


def by_key(samples: FlowSamples) -> tuple[pd.DataFrame, np.ndarray]:
    """Meta and x sorted by (subject, clip)."""
    order = np.lexsort((samples.meta["clip"], samples.meta["subject"]))
    return samples.meta.iloc[order].reset_index(drop=True), samples.x[order]


def assert_same(read: FlowSamples, written: FlowSamples, columns=("database", "subject",
                                                                  "clip", "label")):
    meta_r, x_r = by_key(read)
    meta_w, x_w = by_key(written)
    pd.testing.assert_frame_equal(meta_r[list(columns)], meta_w[list(columns)],
                                  check_dtype=False)
    assert x_r.shape == x_w.shape and x_r.dtype == np.float32
    assert np.abs(x_r - x_w).max() <= 0.5 / 255 + 1e-6


@pytest.fixture
def written(tmp_path):
    samples = make_samples()
    root = tmp_path / "fc"
    notes = write_flowcache(samples, root)
    assert notes == []
    return samples, root


# ---------------------------------------------------------------------------------- round trip


def test_round_trip_flat(written):
    samples, root = written
    csv = pd.read_csv(root / "flowcache.csv", dtype=str)
    assert list(csv.columns) == ["dataset", "sub", "filename_o", "label", "emotion", "synthetic"]
    assert (root / "006_006_0_0 .png").is_file()
    back = read_flowcache(root)
    assert_same(back, samples, ("database", "subject", "clip", "label", "emotion"))
    assert back.meta["subject"].tolist()[:2] == ["006", "006"]  # zero padding kept
    assert back.meta["label"].dtype == np.int64
    assert back.synthetic is False and back.class_names == ["negative", "positive", "surprise"]
    assert back.provenance["format"] == "flowcache" and back.provenance["layout"] == "flat"
    assert back.provenance["csv"].endswith("flowcache.csv")
    assert back.meta["subject_key"][0] == "samm/006"


def test_round_trip_tree_without_csv(written):
    samples, root = written
    for subject in ("006", "007", "sub01"):
        assert len(list((root / subject / "u_test").rglob("*.png"))) == 2
        assert len(list((root / subject / "u_train").rglob("*.png"))) == 4
    assert (root / "007" / "u_test" / "1" / "007_007_1_0 .png").is_file()
    (root / "flowcache.csv").unlink()
    back = read_flowcache(root)
    assert back.provenance["layout"] == "tree" and back.provenance["csv"] is None
    assert set(back.meta["database"]) == {"flowcache"}
    assert_same(back, samples, ("subject", "clip", "label"))


def test_csv_with_tree_only_takes_database_from_csv(written):
    samples, root = written
    for png in root.glob("*.png"):
        png.unlink()
    back = read_flowcache(root)
    assert back.provenance["layout"] == "tree"
    assert_same(back, samples, ("database", "subject", "clip", "label", "emotion"))


def test_round_trip_exact_for_quantised_values(tmp_path):
    samples = make_samples()
    samples.x = np.rint(samples.x * 255) / 255
    write_flowcache(samples, tmp_path / "fc", loso_tree=False)
    assert not (tmp_path / "fc" / "006").exists()
    back = read_flowcache(tmp_path / "fc")
    np.testing.assert_allclose(back.x, samples.x.astype(np.float32), atol=1e-7)


def test_channel_order_is_cv2_array_order(tmp_path):
    samples = make_samples(per=1)
    samples.x[:] = 0
    samples.x[:, 0] = 1.0  # u
    samples.x[:, 2] = 0.5  # strain
    write_flowcache(samples, tmp_path / "fc", loso_tree=False)
    image = cv2.imread(str(tmp_path / "fc" / image_name("006", "006_0_0")))
    assert image.shape == (28, 28, 3)
    assert (image[..., 0] == 255).all() and (image[..., 1] == 0).all()
    assert (image[..., 2] == 128).all()
    back = read_flowcache(tmp_path / "fc")
    assert (back.x[:, 0] == 1).all() and (back.x[:, 1] == 0).all()


def test_other_sizes_and_extra_columns_kept(tmp_path):
    samples = make_samples(size=16)
    write_flowcache(samples, tmp_path / "fc", loso_tree=False)
    csv = pd.read_csv(tmp_path / "fc" / "flowcache.csv", dtype=str)
    csv["objective_class"] = "III"
    csv.to_csv(tmp_path / "fc" / "flowcache.csv", index=False)
    back = read_flowcache(tmp_path / "fc")
    assert back.x.shape == (6, 3, 16, 16)
    assert (back.meta["objective_class"] == "III").all()


def test_synthetic_flag(tmp_path):
    write_flowcache(make_samples(synthetic=True), tmp_path / "syn", loso_tree=False)
    assert read_flowcache(tmp_path / "syn").synthetic is True
    write_flowcache(make_samples(), tmp_path / "real", loso_tree=False)
    assert read_flowcache(tmp_path / "real").synthetic is False


def test_name_without_space_is_accepted(written):
    samples, root = written
    for png in root.glob("* .png"):
        png.rename(png.with_name(png.name.replace(" .png", ".png")))
    assert_same(read_flowcache(root), samples)


def test_images_in_a_subfolder(tmp_path):
    samples = make_samples()
    write_flowcache(samples, tmp_path / "fc" / "images", loso_tree=False)
    shutil.move(tmp_path / "fc" / "images" / "flowcache.csv", tmp_path / "fc" / "labels.csv")
    assert_same(read_flowcache(tmp_path / "fc"), samples)


def test_shared_subject_ids_are_prefixed(tmp_path):
    a = make_samples(subjects=("01", "02"), database="casme2")
    b = make_samples(subjects=("01",), database="samm", seed=1)
    both = FlowSamples(np.concatenate([a.x, b.x]), pd.concat([a.meta, b.meta]), a.class_names)
    notes = write_flowcache(both, tmp_path / "fc")
    assert len(notes) == 1 and "01" in notes[0]
    back = read_flowcache(tmp_path / "fc")
    assert sorted(set(back.meta["subject"])) == ["casme2_01", "casme2_02", "samm_01"]
    assert sorted(set(back.meta["subject_key"])) == ["casme2/casme2_01", "casme2/casme2_02",
                                                      "samm/samm_01"]
    expected = both.meta.assign(subject=both.meta["database"] + "_" + both.meta["subject"])
    assert_same(back, FlowSamples(both.x, expected, both.class_names))
    (tmp_path / "fc" / "flowcache.csv").unlink()
    tree = read_flowcache(tmp_path / "fc")
    assert sorted(set(tree.meta["subject"])) == ["casme2_01", "casme2_02", "samm_01"]


# -------------------------------------------------------------------------------- bad input


def edit_csv(root: Path, change) -> None:
    path = root / "flowcache.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = change(df)
    df.to_csv(path, index=False)


def test_missing_png_names_file_and_row(written):
    _, root = written
    (root / "007_007_1_1 .png").unlink()
    with pytest.raises(FlowCacheError, match="row 5") as err:
        read_flowcache(root)
    assert "007_007_1_1 .png" in str(err.value)


def test_corrupt_png_names_file(written):
    _, root = written
    (root / "sub01_sub01_2_0 .png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(FlowCacheError, match="sub01_sub01_2_0 .png"):
        read_flowcache(root)


def test_grey_png_is_refused(written):
    _, root = written
    cv2.imwrite(str(root / "006_006_0_1 .png"), np.zeros((28, 28), np.uint8))
    with pytest.raises(FlowCacheError, match="006_006_0_1 .png.*3-channel"):
        read_flowcache(root)


def test_size_mismatch_names_file(written):
    _, root = written
    cv2.imwrite(str(root / "007_007_1_0 .png"), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(FlowCacheError, match="007_007_1_0 .png is 32x32"):
        read_flowcache(root)


def test_missing_column_lists_columns(written):
    _, root = written
    edit_csv(root, lambda df: df.drop(columns="filename_o"))
    with pytest.raises(FlowCacheError, match="filename_o") as err:
        read_flowcache(root)
    assert "'emotion'" in str(err.value)  # the columns found are listed


@pytest.mark.parametrize("value", ["3", "x", "-1", ""])
def test_bad_label_names_row(written, value):
    _, root = written

    def change(df):
        df.loc[1, "label"] = value
        return df

    edit_csv(root, change)
    with pytest.raises(FlowCacheError, match="row 3"):
        read_flowcache(root)
    if value == "3":  # in range with more classes
        back = read_flowcache(root, class_names=["a", "b", "c", "d"])
        assert back.meta["label"][1] == 3


def test_subject_collision_across_datasets(written):
    _, root = written

    def change(df):
        df.loc[df["sub"] == "007", "dataset"] = "casme2"
        df.loc[2, "dataset"] = "samm"
        return df

    edit_csv(root, change)
    with pytest.raises(FlowCacheError, match="'007'.*[Pp]refix"):
        read_flowcache(root)


def test_duplicated_sample_names_rows(written):
    _, root = written
    edit_csv(root, lambda df: pd.concat([df, df.iloc[[1]]]))
    with pytest.raises(FlowCacheError, match=r"rows \[3, 8\]"):
        read_flowcache(root)


def test_several_csvs_need_a_choice(written):
    samples, root = written
    shutil.copy(root / "flowcache.csv", root / "other.csv")
    with pytest.raises(FlowCacheError, match="csv="):
        read_flowcache(root)
    assert_same(read_flowcache(root, csv="flowcache.csv"), samples)
    with pytest.raises(FlowCacheError, match="nothere.csv"):
        read_flowcache(root, csv="nothere.csv")


def test_tree_sample_in_two_subjects(written):
    _, root = written
    (root / "flowcache.csv").unlink()
    extra = root / "006" / "u_test" / "1" / "007_007_1_0 .png"
    shutil.copy(root / "007" / "u_test" / "1" / "007_007_1_0 .png", extra)
    with pytest.raises(FlowCacheError, match="007_007_1_0 .png.*exactly one subject"):
        read_flowcache(root)


def test_tree_inconsistent_u_train(written):
    _, root = written
    (root / "flowcache.csv").unlink()
    (root / "sub01" / "u_train" / "1" / "007_007_1_0 .png").unlink()
    with pytest.raises(FlowCacheError, match=r"sub01[/\\]u_train: 3 images.*007_007_1_0"):
        read_flowcache(root)


def test_tree_bad_label_folder(written):
    _, root = written
    (root / "flowcache.csv").unlink()
    (root / "006" / "u_test" / "7").mkdir()
    with pytest.raises(FlowCacheError, match=r"u_test[/\\]7"):
        read_flowcache(root)


def test_csv_row_missing_from_tree(written):
    _, root = written
    for png in root.glob("*.png"):
        png.unlink()
    for png in root.rglob("007_007_1_1 .png"):  # a consistent tree without that sample
        png.unlink()
    with pytest.raises(FlowCacheError, match="row 5"):
        read_flowcache(root)


def test_not_a_flow_cache(tmp_path):
    with pytest.raises(FlowCacheError, match="does not exist"):
        read_flowcache(tmp_path / "nothing")
    with pytest.raises(FlowCacheError, match="neither a CSV nor LOSO"):
        read_flowcache(tmp_path)


def test_writer_refusals(tmp_path, written):
    samples, root = written
    with pytest.raises(FlowCacheError, match="not empty"):
        write_flowcache(samples, root)
    samples.x[0, 0, 0, 0] = 1.5
    with pytest.raises(FlowCacheError, match=r"\[0, 1\]"):
        write_flowcache(samples, tmp_path / "new")
    dup = make_samples()
    dup.meta.loc[1, "clip"] = dup.meta.loc[0, "clip"]
    with pytest.raises(FlowCacheError, match="samples 0 and 1"):
        write_flowcache(dup, tmp_path / "dup")


# ------------------------------------------------------- nothing silent, nothing lost (issue 12)


def test_header_only_csv_is_refused(tmp_path):
    root = tmp_path / "fc"
    write_flowcache(make_samples(), root, loso_tree=False)
    edit_csv(root, lambda df: df.iloc[:0])
    with pytest.raises(FlowCacheError, match=r"flowcache\.csv has a header but no rows"):
        read_flowcache(root)


def test_missing_png_of_the_first_row_is_named(tmp_path):
    root = tmp_path / "fc"
    write_flowcache(make_samples(), root, loso_tree=False)
    (root / "006_006_0_0 .png").unlink()
    with pytest.raises(FlowCacheError, match=r"flowcache\.csv row 2 \(sub=006") as err:
        read_flowcache(root)
    assert "006_006_0_0 .png" in str(err.value) and "neither" not in str(err.value)


def test_no_png_of_any_row_names_the_first_missing(tmp_path):
    root = tmp_path / "fc"
    write_flowcache(make_samples(), root, loso_tree=False)
    for png in root.glob("*.png"):
        png.unlink()
    with pytest.raises(FlowCacheError, match=r"none of the 6 images.*row 2.*006_006_0_0 \.png"):
        read_flowcache(root)


def test_png_without_a_csv_row_is_warned_and_listed(tmp_path, caplog):
    samples, root = make_samples(), tmp_path / "fc"
    write_flowcache(samples, root, loso_tree=False)
    shutil.copy(root / "006_006_0_0 .png", root / "099_099_extra .png")
    with caplog.at_level("WARNING", logger="mer.data.databases.flowcache"):
        back = read_flowcache(root)
    assert_same(back, samples)  # the listed samples, and only them
    assert back.provenance["unlisted_images"] == ["099_099_extra .png"]
    assert [(e["clip"], e["database"]) for e in back.excluded] == [("099_099_extra",
                                                                    "flowcache")]
    assert "no row in" in back.excluded[0]["reason"]
    assert "099_099_extra .png" in caplog.text and "flowcache.csv" in caplog.text


@pytest.mark.parametrize("with_csv", [True, False])
def test_a_single_class_is_refused(tmp_path, with_csv):
    samples, root = make_samples(), tmp_path / "fc"
    samples.meta["label"] = 1
    write_flowcache(samples, root)
    if not with_csv:
        (root / "flowcache.csv").unlink()
    with pytest.raises(FlowCacheError, match="at least two classes, found only 'positive'") as err:
        read_flowcache(root)
    assert str(root / "flowcache.csv" if with_csv else root) in str(err.value)


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    with pytest.raises(OSError, match="No space"):
        write_flowcache(make_samples(), tmp_path / "fc")
    assert list(tmp_path.iterdir()) == []  # neither a half cache nor a temporary folder

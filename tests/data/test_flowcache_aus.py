"""AU labels for a flow cache: the real CASME II / SAMM sheets joined to a cache written in the
exchange format, by database, subject (normalised explicitly) and clip; SMIC stays masked;
unmatched clips are an error, or masked and reported, never a silent partial join."""

import numpy as np
import pandas as pd
import pytest

from mer.data.aus import PSYAU_AUS
from mer.data.databases.flowcache import (
    FlowCacheError,
    canonical_subject,
    read_flowcache,
    sheet_database,
    write_flowcache,
)
from mer.data.samples import FlowSamples

# (database, subject as the cache writes it, clip, label, the sheet's AUs)
CLIPS = [("casme2", "sub01", "EP02_01f", 1, (12,)),
         ("casme2", "sub04", "EP12_02f", 0, (4, 9, 14)),  # 4+L9+14 in the sheet
         ("casme2", "sub26", "EP18_50", 2, None),
         ("samm", "006", "006_1_2", 0, (4, 7)),
         ("samm", "006", "006_1_3", 2, (4,)),
         ("smic", "s1", "s1_ne_01", 0, None),
         ("smic", "s2", "s2_po_02", 1, None)]


def write_cache(root, clips=CLIPS, dataset=None):
    rows = [{"database": dataset or d, "subject": s, "clip": c, "label": lab}
            for d, s, c, lab, _ in clips]
    x = np.random.default_rng(0).random((len(rows), 3, 28, 28), dtype=np.float32)
    write_flowcache(FlowSamples(x, pd.DataFrame(rows), ["negative", "positive", "surprise"]),
                    root)
    return root


@pytest.fixture
def sheets(annotation_sheet):
    return {"casme2": annotation_sheet("CASME2-coding.xlsx"),
            "samm": annotation_sheet("SAMM-coding.xlsx")}


def au_of(samples, clip):
    row = samples.meta.index[samples.meta["clip"] == clip][0]
    return samples.meta.loc[row]


def test_the_join_gives_each_clip_its_sheets_aus(sheets, tmp_path):
    cache = write_cache(tmp_path / "cache")
    # sub26/EP18_50 is in the CASME II sheet too (AU 4)
    samples = read_flowcache(cache, sheets=[str(sheets["casme2"]), str(sheets["samm"])])
    meta = samples.meta
    expected = {"EP02_01f": (12,), "EP12_02f": (4, 9, 14), "EP18_50": (4,),
                "006_1_2": (4, 7), "006_1_3": (4,)}
    for clip, aus in expected.items():
        assert tuple(au_of(samples, clip)["aus"]) == aus and au_of(samples, clip)["has_aus"]
    assert not meta.loc[meta["database"] == "smic", "has_aus"].any()  # no AUs: masked
    assert meta.loc[meta["database"] == "smic", "aus"].map(len).eq(0).all()
    join = samples.provenance["au_join"]
    assert join["matched"] == 5 and join["unmatched"] == 0 and join["no_aus"] == {"smic": 2}
    assert join["per_database"]["casme2"]["matched"] == 3
    assert join["per_database"]["samm"]["sheet_rows"] == 159
    assert join["sheets"] == {"casme2": str(sheets["casme2"]), "samm": str(sheets["samm"])}
    # what DPK-GAT's AU loss and data prior read
    targets, mask = samples.au_targets()
    assert mask.tolist() == meta["has_aus"].tolist()
    first = meta.index[meta["clip"] == "EP02_01f"][0]
    assert targets[first].tolist() == [float(a == 12) for a in PSYAU_AUS]


def test_sheets_given_by_database_and_cache_names_in_capitals(sheets, tmp_path):
    clips = [c for c in CLIPS if c[0] == "samm"]
    cache = write_cache(tmp_path / "cache", clips, dataset="SAMM")
    samples = read_flowcache(cache, sheets={"samm": str(sheets["samm"])})
    assert samples.meta["has_aus"].all() and samples.provenance["au_join"]["matched"] == 2


def test_the_database_of_each_real_sheet_is_detected(sheets, annotation_sheet):
    assert sheet_database(sheets["casme2"]) == "casme2"
    assert sheet_database(sheets["samm"]) == "samm"
    assert sheet_database(annotation_sheet("cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx")) == \
        "casme3"


def test_a_sheet_given_under_the_wrong_database_is_refused(sheets, tmp_path):
    cache = write_cache(tmp_path / "cache")
    with pytest.raises(FlowCacheError, match=r"data.sheets.samm.*CASME2-coding.xlsx.*casme2"):
        read_flowcache(cache, sheets={"samm": str(sheets["casme2"]),
                                      "casme2": str(sheets["casme2"])})


def test_unmatched_clips_are_an_error_naming_them(sheets, tmp_path):
    clips = CLIPS + [("casme2", "sub01", "EP99_99", 2, None)]
    cache = write_cache(tmp_path / "cache", clips)
    with pytest.raises(FlowCacheError, match=r"1 of 6 clips.*casme2/sub01/EP99_99.*"
                                             r"data.on_unmatched=mask"):
        read_flowcache(cache, sheets=list(sheets.values()))


def test_a_database_without_a_sheet_is_unmatched_not_silently_masked(sheets, tmp_path):
    cache = write_cache(tmp_path / "cache")
    with pytest.raises(FlowCacheError, match=r"2 of 5 clips.*no sheet for samm.*data.sheets"):
        read_flowcache(cache, sheets=[str(sheets["casme2"])])


def test_mask_keeps_unmatched_clips_without_aus_and_reports_them(sheets, tmp_path, capsys):
    clips = CLIPS + [("casme2", "sub01", "EP99_99", 2, None)]
    cache = write_cache(tmp_path / "cache", clips)
    samples = read_flowcache(cache, sheets=list(sheets.values()), on_unmatched="mask")
    row = au_of(samples, "EP99_99")
    assert not row["has_aus"] and tuple(row["aus"]) == ()
    join = samples.provenance["au_join"]
    assert join["matched"] == 5 and join["unmatched"] == 1
    assert join["unmatched_clips"] == [{"database": "casme2", "subject": "sub01",
                                        "clip": "EP99_99", "reason": "no row in " +
                                        str(sheets["casme2"])}]
    out = capsys.readouterr().out
    assert "5 of 6 clips matched" in out and "1 unmatched" in out and "smic 2" in out


def test_without_sheets_nothing_changes(tmp_path):
    samples = read_flowcache(write_cache(tmp_path / "cache"))
    assert "has_aus" not in samples.meta and "au_join" not in samples.provenance
    assert not samples.au_targets()[1].any()


@pytest.mark.parametrize("database,written,expected", [
    ("casme2", "1", "sub01"), ("casme2", "01", "sub01"), ("casme2", "sub01", "sub01"),
    ("casme2", "sub1", "sub01"), ("casme2", "casme2_sub01", "sub01"), ("casme2", 17, "sub17"),
    ("samm", "6", "006"), ("samm", "006", "006"), ("samm", 6, "006"), ("samm", "samm_006", "006"),
    ("casme3", "spNO.1", "spNO.1"), ("casme3", "spno1", "spNO.1"),
])
def test_subject_ids_are_normalised_explicitly(database, written, expected):
    assert canonical_subject(database, written) == expected


def test_a_subject_id_of_another_form_is_not_guessed():
    assert canonical_subject("casme2", "s3") is None
    assert canonical_subject("samm", "sub06") is None


def test_unknown_dataset_names_say_how_to_fix(sheets, tmp_path):
    cache = write_cache(tmp_path / "cache", CLIPS[:2], dataset="mydb")
    with pytest.raises(FlowCacheError, match=r"dataset 'mydb'.*casme2.*samm"):
        read_flowcache(cache, sheets=list(sheets.values()))


def test_the_data_config_passes_the_sheets(sheets, tmp_path):
    from hydra import compose, initialize_config_dir

    from mer.data.sources import load_samples
    from mer.run import CONFIG_DIR

    cache = write_cache(tmp_path / "cache")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[
            "data=flowcache", f"data.root={cache}",
            f"data.sheets=[{sheets['casme2']},{sheets['samm']}]"])
    samples = load_samples(cfg.data, tmp_path / "mer-cache")
    assert samples.provenance["au_join"]["matched"] == 5

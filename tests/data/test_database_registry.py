"""read_database / read_intervals, the data configs and the sources hook (data=<name>,
data=composite)."""

from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from mer.data.databases import DATABASES, LONG_VIDEO, DatabaseError, read_database, read_intervals
from mer.data.databases.common import Problems
from mer.data.labels import LabelError, apply_label_scheme
from mer.data.sources import DataConfigError, read_tables
from mer.run import CONFIG_DIR

DATA_CONF = Path(CONFIG_DIR) / "data"


def test_unknown_names_and_options(tmp_path):
    with pytest.raises(DatabaseError, match=r"unknown database 'samm2'.*'casme2'"):
        read_database("samm2", tmp_path)
    with pytest.raises(DatabaseError, match=r"'samm' has no long videos"):
        read_intervals("samm", tmp_path)
    with pytest.raises(DatabaseError, match=r"on_error='ignore': use one of"):
        Problems(tmp_path, "smic", "ignore")
    (tmp_path / "SAMM" / "006").mkdir(parents=True)
    with pytest.raises(DatabaseError, match=r"no SAMM coding sheet .*set data.sheet"):
        read_database("samm", tmp_path)
    with pytest.raises(DatabaseError, match=r"no CAS\(ME\)\^3 subject folders"):
        read_database("casme3", tmp_path)


def test_every_database_has_a_config():
    for name in DATABASES:
        cfg = OmegaConf.load(DATA_CONF / f"{name}.yaml")
        assert cfg.kind == cfg.name == name and "root" in cfg and "label_scheme" in cfg
    composite = OmegaConf.load(DATA_CONF / "composite.yaml")
    assert set(composite.roots) == {"casme2", "samm", "smic"}
    assert set(LONG_VIDEO) == {"casme_sq", "samm_lv"}


def _smic(build, root):
    for subject, emotion, clip in [("s1", "negative", "s1_ne_01"), ("s2", "surprise", "s2_sur_01")]:
        build.frames(root / "HS" / subject / "micro" / emotion / clip, range(1, 4),
                     name="image{:06d}.bmp")
    return root


def _from_real_sheet(build, root, sheet, tree, subject_fmt, frame_name, cols):
    real = pd.read_excel(sheet)
    for r in real.to_dict("records"):
        subject = subject_fmt.format(int(r["Subject"]))
        build.frames(root / tree / subject / r["Filename"], {int(r[c]) for c in cols},
                     name=frame_name.replace("<s>", subject), grey=True)
    return root


def test_data_config_of_one_database(build, tmp_path):
    cfg = OmegaConf.load(DATA_CONF / "smic.yaml")
    cfg.root = str(_smic(build, tmp_path))
    table, skipped, families, provenance = read_tables(cfg, tmp_path / "cache")
    assert list(table["clip"]) == ["s1_ne_01", "s2_sur_01"] and skipped == []
    assert families == {"smic": "smic"} and provenance["source"] == "smic"
    cfg.root = None
    with pytest.raises(DataConfigError, match="data=smic needs data.root"):
        read_tables(cfg, tmp_path / "cache")


def test_composite_config_without_a_root(tmp_path):
    cfg = OmegaConf.load(DATA_CONF / "composite.yaml")
    with pytest.raises(DataConfigError, match=r"data=composite needs data.roots.casme2="):
        read_tables(cfg, tmp_path)


def test_megc2019_composite_from_the_real_sheets(annotation_sheet, build, tmp_path):
    """data=composite on CASME II and SAMM trees built from the real sheets (+ a tiny SMIC):
    88/32/25 and 92/26/15 negative/positive/surprise."""
    casme2_sheet = annotation_sheet("CASME2-coding.xlsx")
    samm_sheet = annotation_sheet("SAMM-coding.xlsx")
    cfg = OmegaConf.load(DATA_CONF / "composite.yaml")
    cfg.roots.casme2 = str(_from_real_sheet(
        build, tmp_path / "casme2", casme2_sheet, "CASME2_RAW_selected", "sub{:02d}",
        "img{}.jpg", ["Onset Frame", "Apex Frame", "OffsetFrame"]))
    cfg.roots.samm = str(_from_real_sheet(
        build, tmp_path / "samm", samm_sheet, "SAMM", "{:03d}", "<s>_{:05d}.jpg",
        ["Onset Frame", "Apex Frame", "Offset Frame"]))
    cfg.roots.smic = str(_smic(build, tmp_path / "smic"))
    cfg.sheets = {"casme2": str(casme2_sheet), "samm": str(samm_sheet)}
    table, skipped, families, provenance = read_tables(cfg, tmp_path / "cache")
    assert skipped == [] and families == {"casme2": "casme2", "samm": "samm", "smic": "smic"}
    assert provenance["source"] == "composite" and set(provenance["roots"]) == set(families)
    kept, classes, excluded = apply_label_scheme(table, cfg.label_scheme, families)
    counts = {db: [int((g["label"] == c).sum()) for c in range(3)]
              for db, g in kept.groupby("database")}
    assert classes == ["negative", "positive", "surprise"]
    assert counts == {"casme2": [88, 32, 25], "samm": [92, 26, 15], "smic": [1, 0, 1]}
    assert kept.groupby("database")["subject"].nunique().to_dict() == {
        "casme2": 24, "samm": 28, "smic": 2}


def _table(emotions, objective=None):
    n = len(emotions)
    return pd.DataFrame({"database": ["synA"] * n, "subject": [f"s{i}" for i in range(n)],
                         "clip": [f"c{i}" for i in range(n)], "emotion": emotions,
                         "objective": objective or [""] * n, "aus": [(12,)] * n,
                         "row": list(range(2, n + 2))})


def test_emotion_scheme_blank_and_spelling():
    """A blank emotion became a class named ''; 'Anger ' beside 'anger' raised ValueError."""
    kept, classes, excluded = apply_label_scheme(_table(["anger", "Anger ", "", "fear"]),
                                                 "emotion", "samm")
    assert classes == ["anger", "fear"] and list(kept["label"]) == [0, 0, 1]
    assert excluded == [{"database": "synA", "subject": "s2", "clip": "c2",
                         "reason": "no emotion in the sheet (row 4)"}]


def test_mapping_keys_any_case_and_unknown_family():
    """{'Happiness': ...} matched nothing (every sample excluded); a database missing from the
    family mapping raised a bare KeyError."""
    kept, classes, excluded = apply_label_scheme(
        _table(["happiness", "fear"]), {"Happiness": "positive", " Fear": "negative"}, "x")
    assert classes == ["negative", "positive"] and list(kept["label"]) == [1, 0]
    with pytest.raises(LabelError, match=r"database 'synA' has no family in \{'samm': 'samm'\}"):
        apply_label_scheme(_table(["fear"]), "composite", {"samm": "samm"})
    with pytest.raises(LabelError, match=r"'Fear' and ' fear' .*both map 'fear'"):
        apply_label_scheme(_table(["fear"]), {"Fear": "a", " fear": "b"}, "x")

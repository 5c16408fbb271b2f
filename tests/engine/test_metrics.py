import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, recall_score
from sklearn.metrics import confusion_matrix as sk_confusion

from mer.engine.metrics import recognition_metrics


@pytest.mark.parametrize("seed", range(25))
def test_uf1_uar_equal_sklearn_macro(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    n = int(rng.integers(1, 80))
    y_true = rng.integers(0, k, n)
    # predictions skewed and sometimes missing classes, sometimes predicting unseen ones
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, k, n))
    m = recognition_metrics(y_true, y_pred, [str(i) for i in range(k)])
    assert m["uf1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert m["uar"] == pytest.approx(
        recall_score(y_true, y_pred, average="macro", zero_division=0))
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    np.testing.assert_array_equal(
        np.array(m["confusion_matrix"]), sk_confusion(y_true, y_pred, labels=list(range(k))))


def test_known_answer():
    # 3 classes; class 2 never predicted.
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 0, 0]
    m = recognition_metrics(y_true, y_pred, ["neg", "pos", "sur"])
    f1 = [2 * 2 / (3 + 4), 2 * 1 / (2 + 2), 0.0]
    rec = [2 / 3, 1 / 2, 0.0]
    assert m["uf1"] == pytest.approx(sum(f1) / 3)
    assert m["uar"] == pytest.approx(sum(rec) / 3)
    assert m["per_class"]["sur"] == {"f1": 0.0, "recall": 0.0, "support": 1}
    assert m["accuracy"] == pytest.approx(3 / 6)

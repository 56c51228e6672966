"""openbox.record: the JSON record follows the dataclasses; the .npz holds the arrays.

The record's values are compared with the explanation, the model's own float64
forward pass and numpy summaries computed here; its shape with the dataclasses'
fields as Python lists them (so a field the engine adds must appear in it).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import openbox
from openbox import record
from openbox.engine import Explanation, VerificationReport
from openbox.features import DecisionFeatures, decision_features
from openbox.fmnist.checkpoints import load_checkpoint
from openbox.fmnist.data import CLASSES, load_sample
from openbox.fmnist.demo import demo_checkpoint

F64 = torch.float64
ROWS = [0, 150, 420]


@pytest.fixture(scope="module")
def demo():
    model, _ = load_checkpoint(demo_checkpoint())
    sample = load_sample()
    ob = openbox.OpenBox(model, (1, 28, 28), dtype=F64, domain=(0.0, 1.0))
    x = sample.images[ROWS].double()
    return model, ob, x, sample.labels[ROWS].tolist(), ob.explain(x)


def model_logits(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).double()(x)


# --------------------------------------------------------------------------- plain, row


def test_plain_follows_fields_and_properties_of_any_dataclass():
    big = torch.arange(100, dtype=F64).reshape(4, 25) - 30
    Extra = dataclasses.make_dataclass(
        "Extra", [("small", torch.Tensor), ("big", torch.Tensor), ("mask", torch.Tensor),
                  ("unbounded", float), ("dtype", torch.dtype), ("nodes", dict),
                  ("blob", bytes)],
        namespace={"total": property(lambda self: float(self.small.sum()))},
    )
    mask = torch.arange(80) % 3 == 0
    v = Extra(torch.tensor([1.5, -2.0]), big, mask, math.inf, torch.float32,
              {3: torch.tensor([7])}, b"\x01\xff")
    assert record.plain(v) == {
        "small": [1.5, -2.0],
        "big": {"shape": [4, 25], "dtype": "float64", "min": -30.0, "max": 69.0},
        "mask": {"shape": [80], "dtype": "bool", "n_true": int(mask.sum())},
        "unbounded": None,
        "dtype": "float32",
        "nodes": {"3": [7]},
        "blob": "01ff",
        "total": -0.5,
    }
    assert record.plain(big, max_elements=100)[3][:2] == [45.0, 46.0]


def test_row_takes_one_input_of_every_batched_field(demo):
    _, _, x, _, e = demo
    for i in range(len(ROWS)):
        r = record.row(e, i)
        assert set(r) >= {f.name for f in dataclasses.fields(Explanation)}
        assert torch.equal(r["weight"], e.weight[i]) and torch.equal(r["logits"], e.logits[i])
        assert r["region_key"] == e.region_key[i] and int(r["prediction"]) == \
            int(e.logits[i].argmax())
        conf = r["configuration"]
        assert int(conf["n_tight_pool"]) == int(e.configuration.n_tight_pool[i])
        for node, on in e.configuration.on.items():
            assert torch.equal(conf["on"][node], on[i])


# --------------------------------------------------------------------------- the record


def make_record(demo, i=1, versus="rest"):
    model, ob, x, labels, e = demo
    one = e[i]
    report = ob.verify(x[i : i + 1])
    features = decision_features(one, 0, versus=versus)
    poly = ob.polytope(x[i])
    radii = ob.radius_pair(x[i : i + 1])
    rec = record.explanation_record(
        model={"description": "demo"}, input={"index": ROWS[i]}, label=labels[i],
        class_names=CLASSES, explanation=one, report=report, features=features,
        polytope=poly, radii=(float(radii.l2[0]), float(radii.linf[0])),
        inscribed=(None, "skipped"), tolerances=ob.tol, dtype=F64,
    )
    return rec, one, report, features, poly


def test_record_holds_every_field_of_the_dataclasses(demo):
    rec, one, report, features, _ = make_record(demo)
    for section, klass in (("explanation", Explanation), ("verification", VerificationReport),
                           ("decision_features", DecisionFeatures)):
        names = {f.name for f in dataclasses.fields(klass)}
        assert names <= set(rec[section]), (section, names - set(rec[section]))
    assert set(rec["tolerances"]) == {f.name for f in dataclasses.fields(type(demo[1].tol))}
    json.dumps(rec, allow_nan=False)  # plain JSON: no NaN / inf, no tensors


def test_record_values_are_the_models(demo):
    model, ob, x, labels, _ = demo
    i = 1
    rec, one, report, features, poly = make_record(demo, i, versus=7)
    want = model_logits(model, x[i : i + 1])[0]
    np.testing.assert_allclose(rec["explanation"]["logits"], want.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(rec["verification"]["logits"], want.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(rec["explanation"]["bias"], one.bias[0].numpy(), rtol=0, atol=0)
    predicted = int(want.argmax())
    assert rec["predicted"] == predicted and rec["predicted_name"] == CLASSES[predicted]
    assert rec["label"] == labels[i] and rec["correct"] == (predicted == labels[i])
    weight = one.weight[0].numpy()
    assert rec["explanation"]["weight"] == {"shape": [10, 1, 28, 28], "dtype": "float64",
                                            "min": float(weight.min()),
                                            "max": float(weight.max())}
    assert rec["region_key"] == rec["explanation"]["region_key"] == str(one.region_key[0])
    assert rec["explanation"]["n_tight"] == int(one.n_tight[0]) == \
        rec["explanation"]["configuration"]["n_tight_relu"] + \
        rec["explanation"]["configuration"]["n_tight_pool"]
    assert rec["verification"]["ok"] is True and rec["verification"]["passed"] is True
    f = rec["decision_features"]
    assert f["versus"] == 7 and f["versus_name"] == CLASSES[7]
    assert f["target"] == predicted and f["target_name"] == CLASSES[predicted]
    assert f["logit_gap"] == pytest.approx(float(want[predicted] - want[7]), abs=1e-10)
    assert f["delta"] == pytest.approx(f["logit_gap"] - f["model_gap"], abs=0)
    assert rec["polytope"]["n_constraints"] == poly.A.shape[0]
    assert rec["polytope"]["n_inputs"] == 784 and rec["polytope"]["domain"] == [0.0, 1.0]
    r = ob.radius_pair(x[i : i + 1])
    assert rec["certified_radius"]["l2"] == float(r.l2[0])
    assert rec["certified_radius"]["linf"] == float(r.linf[0])
    assert rec["inscribed_radius"] == {"value": None, "note": "skipped"}


def test_npz_holds_the_arrays(demo, tmp_path):
    model, ob, x, labels, e = demo
    i = 2
    one = e[i]
    features = decision_features(one, 0, target=3)
    report = ob.verify(x[i : i + 1])
    path = record.save_npz(tmp_path / "e.npz", explanation=one, features=features,
                           radii=(0.25, math.inf), report=report, label=labels[i],
                           class_names=CLASSES)
    with np.load(path, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["weight"], e.weight[i].numpy())
        np.testing.assert_array_equal(z["bias"], e.bias[i].numpy())
        np.testing.assert_array_equal(z["input"], x[i].numpy())
        others = [e.weight[i, k] for k in range(10) if k != 3]
        np.testing.assert_allclose(z["contrast"], (e.weight[i, 3] - torch.stack(others)
                                                   .mean(0)).numpy(), rtol=0, atol=1e-13)
        assert bytes(z["region_key"]) == bytes(e.region_key[i])
        assert str(z["region_key_digest"]) == str(e.region_key[i])
        assert float(z["certified_radius_l2"]) == 0.25 and math.isinf(z["certified_radius_linf"])
        assert int(z["target"]) == 3 and str(z["versus"]) == "rest"
        assert int(z["label"]) == labels[i] and list(z["class_names"]) == list(CLASSES)
        assert bool(z["verified"]) and float(z["max_abs_error"]) <= 1e-10
        assert int(z["prediction"]) == int(model_logits(model, x[i : i + 1]).argmax())

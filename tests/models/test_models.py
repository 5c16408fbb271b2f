import lightning as L
import pytest
import torch

from mer.data.datamodule import batch_loader
from mer.engine.module import MERModule
from mer.models.registry import create_model, list_models


def test_registry_lists_models():
    assert {"ststnet", "offapexnet"} <= set(list_models())
    with pytest.raises(KeyError, match="unknown model"):
        create_model("no_such_net")


def test_ststnet_matches_the_published_shape():
    net = create_model("ststnet", num_classes=3)
    # 3 + 5 + 8 filters after the 3x3 convs, 400 features into the classifier
    assert [b[0].out_channels for b in net.branches] == [3, 5, 8]
    assert net.fc.in_features == 400 and net.fc.out_features == 3
    assert net(torch.randn(2, 3, 28, 28)).shape == (2, 3)


def test_offapexnet_uses_only_u_and_v():
    net = create_model("offapexnet", num_classes=3).eval()
    x = torch.randn(2, 3, 28, 28)
    x2 = x.clone()
    x2[:, 2] = torch.randn(2, 28, 28)  # change strain only
    torch.testing.assert_close(net(x), net(x2))


@pytest.mark.parametrize("name", ["ststnet", "offapexnet"])
def test_fast_dev_run_and_gradients(name):
    L.seed_everything(0)
    net = create_model(name, num_classes=3)
    module = MERModule(net, 3, lr=1e-3)
    x, y = torch.rand(40, 3, 28, 28), torch.randint(0, 3, (40,))
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, batch_loader(x, y, batch_size=16, shuffle=True))
    changed = [not torch.equal(b, p) for b, p in zip(before, module.parameters())]
    assert all(changed), "every parameter should receive a gradient step"
    predictor = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    probs = torch.cat(predictor.predict(module, batch_loader(x, y, batch_size=16)))
    assert probs.shape == (40, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(40))

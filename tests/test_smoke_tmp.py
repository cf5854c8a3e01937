import torch
from robench.attacks import PGD, FGSM, BIM
def test_fixture(trained_model, test_tensors):
    x, y = test_tensors
    acc = (trained_model(x).argmax(1) == y).float().mean()
    print("acc", acc)
    assert acc > 0.9
    for cls, kw in ((FGSM, {}), (BIM, dict(steps=10, step_size=0.01)), (PGD, dict(steps=10, step_size=0.01))):
        r = cls(0.1, **kw)(trained_model, x, y)
        print(cls.__name__, (~r.success).float().mean())

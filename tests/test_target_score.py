"""cfx_cli.classifiers.target_score: the class score white-box methods raise, the same for any 2-logit wrapper."""

import pytest
import torch

from cfx_cli.classifiers import target_score


@pytest.mark.parametrize("kind", ["logits", "log_softmax"])
def test_two_class_score_depends_only_on_the_logit_difference(kind):
    torch.manual_seed(0)
    single = torch.randn(6)  # a single-logit binary model: l > 0 means class 1
    targets = torch.tensor([0, 1, 1, 0, 1, 0])
    signed = torch.where(targets == 1, single, -single)
    want = signed if kind == "logits" else torch.nn.functional.logsigmoid(signed)
    for wrapped in (torch.stack([torch.zeros(6), single], 1), torch.stack([-single / 2, single / 2], 1),
                    torch.stack([single - 3, 2 * single - 3], 1)):
        torch.testing.assert_close(target_score(wrapped, targets, kind), want)


def test_many_class_logit_score_is_the_target_logit():
    logits = torch.arange(12.0).reshape(3, 4)
    assert target_score(logits, torch.tensor([0, 3, 1])).tolist() == [0.0, 7.0, 9.0]
    with pytest.raises(ValueError, match="unknown kind"):
        target_score(logits, torch.tensor([0, 0, 0]), "softmax")

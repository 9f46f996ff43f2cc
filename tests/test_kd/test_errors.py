import pytest
import torch

from gkd.core.errors import GkdError


class BrokenImages(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise GkdError("data/x/img.png: image file not found")


def test_error_from_a_dataloader_worker_stays_one_line():
    loader = torch.utils.data.DataLoader(BrokenImages(), num_workers=1)
    with pytest.raises(GkdError) as e:
        list(loader)
    assert str(e.value) == "data/x/img.png: image file not found"


def test_message_is_collapsed_to_one_line():
    assert str(GkdError("a\n  b\tc")) == "a b c"

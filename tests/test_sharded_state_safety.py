"""A sharded checkpoint (torch.distributed.checkpoint) is read without running code from its folder."""
from __future__ import annotations

import pickle

import pytest
import torch

from depthlens.infra.errors import UsageError
from finetune.sharding import load_sharded


def _save(folder):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    model_sd, optim_sd = get_state_dict(m, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))
    return m, opt


def test_a_clean_sharded_checkpoint_round_trips(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    m, opt = _save(tmp_path / "dcp")
    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    fresh(torch.randn(2, 4)).sum().backward()
    fresh_opt.step()
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    states = {"model": model_sd, "optim": optim_sd}
    load_sharded(states, tmp_path / "dcp")
    assert torch.equal(states["model"]["weight"], m.weight.detach())
    want = get_state_dict(m, opt)[1]
    assert states["optim"]["param_groups"][0]["lr"] == want["param_groups"][0]["lr"]
    assert torch.equal(states["optim"]["state"]["weight"]["exp_avg"], want["state"]["weight"]["exp_avg"])


class _Payload:
    def __reduce__(self):
        return (open, (str(_Payload.marker), "w"))


def test_a_tampered_metadata_pickle_is_refused_and_not_run(tmp_path):
    _save(tmp_path / "dcp")
    _Payload.marker = tmp_path / "payload-ran"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(UsageError, match="refusing to unpickle"):
        load_sharded({"model": {"weight": torch.zeros(3, 4)}}, tmp_path / "dcp")
    assert not _Payload.marker.exists()

"""Differentially private training: budget, accounting, validation and provenance.

The tests train a deliberately tiny DPLSTM synthesizer defined here (the real generators have
their own DP tests), through the same base seam ``Synthesizer._make_private`` they use.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from opacus.data_loader import DPDataLoader
from opacus.layers import DPLSTM
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from synthmed import Cohort, load_synthesizer
from synthmed.datasets import simulate_cohort
from synthmed.models import privacy
from synthmed.models.base import GeneratedBatch, Synthesizer
from synthmed.models.persistence import read_model_file
from synthmed.models.privacy import (
    PrivacyError,
    PrivacyWarning,
    check_module,
    check_public_schema,
    checkpoint_state,
    default_delta,
    make_private,
    plain_state_dict,
    privacy_details,
    record_spent,
    releasable_history,
    resolve_delta,
    restore_checkpoint_state,
)
from synthmed.models.transforms import StaticEncoder, ValueScaler

N_PATIENTS = 120

# Opacus' backward hooks on a first layer whose input needs no gradient: harmless.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@dataclasses.dataclass
class TinyConfig:
    """Architecture of the test model. ``recurrent="torch"`` uses nn.LSTM (not DP-compatible)."""

    hidden: int = 8
    max_steps: int = 6
    step_hours: float = 2.0
    recurrent: str = "dp"
    batch_norm: bool = False


class TinyNet(nn.Module):
    """A learned mean of the encoded static vector, and an LSTM over the values."""

    def __init__(self, static_width: int, n_vars: int, config: TinyConfig) -> None:
        super().__init__()
        self.static_mean = nn.Linear(1, static_width)
        self.init = nn.Linear(static_width, config.hidden)
        recurrent = DPLSTM if config.recurrent == "dp" else nn.LSTM
        self.lstm = recurrent(n_vars, config.hidden, batch_first=True)
        self.norm = nn.BatchNorm1d(config.hidden) if config.batch_norm else nn.Identity()
        self.head = nn.Linear(config.hidden, n_vars)
        self.forward_calls = 0

    def start(self, static: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.init(static)).unsqueeze(0)
        return h, torch.zeros_like(h)

    def forward(self, static: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
        """Mean over the batch of each patient's static + masked next-value squared error."""
        self.forward_calls += 1
        ones = torch.ones(len(static), 1)
        static_loss = ((self.static_mean(ones) - static) ** 2).mean(dim=1)
        inputs = torch.cat([torch.zeros_like(values[:, :1]), values[:, :-1]], dim=1)
        out, _ = self.lstm(inputs, self.start(static))
        predicted = self.head(self.norm(out.transpose(1, 2)).transpose(1, 2))
        error = ((predicted - values) ** 2 * mask).sum(dim=(1, 2))
        return (static_loss + error / mask.sum(dim=(1, 2)).clamp(min=1)).mean()


class TinyDPSynthesizer(Synthesizer):
    """Just enough of a generator to exercise private training end to end."""

    model_type = "test-tiny-dp"
    config_class = TinyConfig

    def __init__(
        self,
        config: TinyConfig | None = None,
        *,
        epochs: int = 2,
        batch_size: int = 24,
        seed: int | None = 0,
        device: str = "cpu",
        verbose: bool = False,
        epsilon: float | None = None,
        delta: float | None = None,
        max_grad_norm: float = 1.0,
    ) -> None:
        super().__init__(
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            device=device,
            verbose=verbose,
            epsilon=epsilon,
            delta=delta,
            max_grad_norm=max_grad_norm,
        )
        self.config = config or TinyConfig()

    def _fit(self, cohort: Cohort, generator: torch.Generator) -> None:
        private = self.epsilon is not None
        if private:
            check_public_schema(cohort)
        arrays = cohort.arrays
        steps = self.config.max_steps  # a setting, never the data's longest stay
        self.static_encoder_ = StaticEncoder().fit(
            cohort.static, cohort.schema, from_bounds=private
        )
        self.scaler_ = ValueScaler().fit(arrays.values, cohort.schema, from_bounds=private)
        values = np.zeros((cohort.n_patients, steps, len(arrays.variables)), dtype=np.float32)
        length = min(steps, arrays.values.shape[1])
        values[:, :length] = self.scaler_.transform(arrays.values[:, :length])
        mask = np.isfinite(values)
        static = torch.tensor(self.static_encoder_.transform(cohort.static))
        values_t = torch.tensor(np.where(mask, values, 0.0))
        mask_t = torch.tensor(mask, dtype=torch.float32)

        self.net_ = TinyNet(static.shape[1], values.shape[2], self.config)
        optimizer = torch.optim.Adam(self.net_.parameters(), lr=0.01)
        loader = DataLoader(
            TensorDataset(torch.arange(cohort.n_patients)),
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
        )
        module, optimizer, loader = self._make_private(self.net_, optimizer, loader, self.epochs)
        losses = []
        for _ in range(self.epochs):
            total = 0.0
            for (index,) in loader:  # an empty Poisson batch still takes a (noisy) step
                optimizer.zero_grad()
                loss = module(static[index], values_t[index], mask_t[index])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) if len(index) else 0.0
            losses.append(total)
        record_spent(self)  # the hook: fills privacy_spent_, detaches Opacus
        history = pd.DataFrame({"epoch": range(1, self.epochs + 1), "loss": losses})
        self.history_ = releasable_history(self, history)
        self._install(plain_state_dict(self.net_))

    def _install(self, state: dict[str, torch.Tensor]) -> None:
        """Sample with nn.LSTM, whatever trained (DPLSTM shares its parameter names)."""
        sampling = dataclasses.replace(self.config, recurrent="torch")
        self.net_ = TinyNet(self.static_encoder_.width_, len(self.scaler_.center_), sampling).eval()
        self.net_.load_state_dict(state, strict=True)

    def _generate(self, conditions: pd.DataFrame, generator: torch.Generator) -> GeneratedBatch:
        n = len(conditions)
        net = self.net_.eval()
        mean = net.static_mean(torch.ones(n, 1))
        noise = torch.randn(mean.shape, generator=generator)
        static = self.static_encoder_.inverse((mean + 0.3 * noise).numpy()).astype(object)
        for name in conditions.columns:
            given = conditions[name].notna().to_numpy()
            static.loc[given, name] = conditions.loc[given, name].to_numpy()
        state = net.start(torch.tensor(self.static_encoder_.transform(static)))
        x = torch.zeros(n, 1, net.head.out_features)
        steps = []
        for _ in range(self.config.max_steps):
            out, state = net.lstm(x, state)
            x = net.head(out) + 0.1 * torch.randn(out.shape[0], 1, x.shape[2], generator=generator)
            steps.append(x[:, 0])
        values = self.scaler_.inverse(torch.stack(steps, dim=1).numpy())
        times = np.tile(np.arange(self.config.max_steps) * self.config.step_hours + 0.5, (n, 1))
        lengths = np.full(n, self.config.max_steps)
        return GeneratedBatch(static, times, values, lengths)

    def _get_state(self):
        config = {
            "static_encoder": self.static_encoder_.to_dict(),
            "scaler": self.scaler_.to_dict(),
            "static_width": self.net_.static_mean.out_features,
            "n_vars": self.net_.head.out_features,
        }
        return config, dict(self.net_.state_dict())

    def _set_state(self, config, tensors):
        self.static_encoder_ = StaticEncoder.from_dict(config["static_encoder"], self.schema_)
        self.scaler_ = ValueScaler.from_dict(config["scaler"], self.schema_)
        self._install(tensors)


@pytest.fixture(scope="module", autouse=True)
def cached_calibration():
    """Memoise Opacus' noise calibration (a pure function, ~1 s a call) across these tests."""
    import opacus.privacy_engine

    cached = functools.lru_cache(maxsize=None)(opacus.privacy_engine.get_noise_multiplier)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(opacus.privacy_engine, "get_noise_multiplier", cached)
        yield


@pytest.fixture(scope="module")
def cohort() -> Cohort:
    return simulate_cohort(N_PATIENTS, seed=0)


@pytest.fixture(scope="module")
def private_model(cohort) -> TinyDPSynthesizer:
    return TinyDPSynthesizer(epsilon=3.0, epochs=3).fit(cohort)


# -- budget and accounting -----------------------------------------------------------------------


def test_dp_fit_spends_at_most_the_requested_epsilon(private_model):
    epsilon, delta = private_model.privacy_spent
    assert epsilon <= 3.0
    # Calibrated, not merely below: noise for a far smaller budget would also pass "<= 3".
    assert epsilon > 2.5
    assert delta == pytest.approx(N_PATIENTS**-1.1)
    assert delta < 1 / N_PATIENTS


def test_spent_epsilon_grows_with_every_epoch(private_model):
    details = privacy_details(private_model)
    by_epoch = details["epsilon_by_epoch"]
    assert len(by_epoch) == 3
    assert all(a < b for a, b in zip(by_epoch, by_epoch[1:], strict=False))
    assert by_epoch[-1] == pytest.approx(private_model.privacy_spent[0])
    phase = details["phases"][0]
    assert phase["steps"] == 3 * round(1 / phase["sample_rate"])
    assert phase["noise_multiplier"] > 0.3


def test_saved_history_holds_no_loss_on_real_patients_under_dp(private_model, cohort):
    history = private_model.history_
    assert list(history.columns) == ["epoch", "epsilon"]
    assert history["epsilon"].tolist() == privacy_details(private_model)["epsilon_by_epoch"]
    assert "loss" in TinyDPSynthesizer(epochs=1).fit(cohort).history_  # kept without DP


def test_accountant_epsilon_grows_with_epochs_at_fixed_noise():
    from opacus.accountants import RDPAccountant

    spent = []
    for epochs in (1, 2, 4, 8):
        accountant = RDPAccountant()
        accountant.history = [(1.0, 0.1, epochs * 10)]
        spent.append(accountant.get_epsilon(delta=1e-5))
    assert all(a < b for a, b in zip(spent, spent[1:], strict=False))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_spent_epsilon_matches_opacus_accountant(accountant):
    from opacus.accountants import create_accountant

    history = [(0.9, 0.05, 40), (1.3, 0.1, 25)]
    reference = create_accountant(mechanism=accountant)
    reference.history = list(history)
    expected = reference.get_epsilon(delta=1e-5)
    assert privacy.spent_epsilon(history, 1e-5, accountant) == pytest.approx(expected, rel=1e-9)
    assert privacy.spent_epsilon([], 1e-5, accountant) == 0.0


def test_same_seed_gives_the_same_private_model(cohort, private_model):
    again = TinyDPSynthesizer(epsilon=3.0, epochs=3).fit(cohort)
    for name, tensor in private_model.net_.state_dict().items():
        torch.testing.assert_close(again.net_.state_dict()[name], tensor)
    other = TinyDPSynthesizer(epsilon=3.0, epochs=3, seed=1).fit(cohort)
    assert not torch.equal(other.net_.head.weight, private_model.net_.head.weight)


def test_a_smaller_budget_means_more_noise():
    runs = []
    for epsilon in (0.5, 2.0):
        model, _, parts = _toy_private(epsilon=epsilon)
        _train(*parts)
        runs.append((record_spent(model)[0], privacy_details(model)["phases"][0]))
    (tight, tight_phase), (loose, loose_phase) = runs
    assert 0.4 < tight <= 0.5 and 1.6 < loose <= 2.0
    assert tight_phase["noise_multiplier"] > 2 * loose_phase["noise_multiplier"]


def test_non_private_model_reports_no_budget(cohort):
    model = TinyDPSynthesizer(epochs=1).fit(cohort)
    assert model.privacy_spent is None
    assert privacy_details(model) is None
    assert "epsilon" not in model.sample(3, seed=0).metadata


# -- settings and refusals -----------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0, -1.0, math.inf, math.nan, "3"])
def test_non_positive_or_non_finite_epsilon_is_refused_at_construction(epsilon):
    with pytest.raises(ValueError, match="epsilon must be a positive finite number"):
        TinyDPSynthesizer(epsilon=epsilon)


def test_default_delta_is_below_one_over_n():
    for n in (2, 10, 4000, 10**6):
        assert 0 < default_delta(n) < 1 / n
    assert default_delta(4000) == pytest.approx(4000**-1.1)
    assert resolve_delta(None, 100) == default_delta(100)
    assert resolve_delta(1e-5, 100) == 1e-5
    with pytest.raises(PrivacyError, match="at least 2"):
        default_delta(1)


def test_delta_not_below_one_over_n_fails_before_training(cohort):
    model = TinyDPSynthesizer(epsilon=3.0, delta=1 / N_PATIENTS)
    with pytest.raises(PrivacyError, match=r"delta=.* must be below 1/n_patients"):
        model.fit(cohort)
    assert model.net_.forward_calls == 0


@pytest.mark.parametrize(
    ("config", "culprit"),
    [
        (TinyConfig(recurrent="torch"), r"lstm \(LSTM\).*DPLSTM"),
        (TinyConfig(batch_norm=True), "norm"),
    ],
)
def test_unsupported_layers_fail_at_fit_start_not_mid_training(cohort, config, culprit):
    model = TinyDPSynthesizer(config, epsilon=3.0)
    with pytest.raises(PrivacyError, match=culprit):
        model.fit(cohort)
    assert model.net_.forward_calls == 0  # refused before the first training step
    # Without DP the same configuration trains: the refusal is about privacy only.
    TinyDPSynthesizer(config, epochs=1).fit(cohort)


def test_check_module_accepts_opacus_layers_and_names_offenders():
    check_module(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), DPLSTM(4, 4, batch_first=True)))
    check_module(nn.GRU(3, 4).requires_grad_(False))  # frozen layers need no per-sample grads
    with pytest.raises(PrivacyError, match=r"encoder \(GRU\)"):
        check_module(nn.ModuleDict({"encoder": nn.GRU(3, 4), "head": nn.Linear(4, 1)}))


def test_plain_state_dict_of_a_nested_dplstm_loads_into_nn_lstm():
    trained = nn.Sequential(nn.Linear(2, 3), DPLSTM(3, 4, batch_first=True))
    assert any(".l0." in key for key in trained.state_dict())  # Opacus' duplicates
    twin = nn.Sequential(nn.Linear(2, 3), nn.LSTM(3, 4, batch_first=True))
    twin.load_state_dict(plain_state_dict(trained), strict=True)
    x = torch.randn(5, 7, 3)
    torch.testing.assert_close(twin[1](x)[0], trained[1](x)[0])


def test_loader_must_hold_one_item_per_patient(cohort):
    model = TinyDPSynthesizer(epsilon=1.0)
    model.n_train_patients_ = N_PATIENTS
    module = nn.Linear(2, 1)
    rows = DataLoader(TensorDataset(torch.zeros(3 * N_PATIENTS, 2)), batch_size=16)
    with pytest.raises(PrivacyError, match="one item must be one patient"):
        make_private(model, module, torch.optim.SGD(module.parameters(), lr=0.1), rows, 1)


def test_optimizer_over_other_parameters_is_refused():
    model = TinyDPSynthesizer(epsilon=1.0)
    model.n_train_patients_ = 50
    module, other = nn.Linear(2, 1), nn.Linear(2, 1)
    loader = DataLoader(TensorDataset(torch.zeros(50, 2)), batch_size=10)
    optimizer = torch.optim.SGD([*module.parameters(), *other.parameters()], lr=0.1)
    with pytest.raises(PrivacyError, match="one optimizer"):
        make_private(model, module, optimizer, loader, 1)


def test_model_that_skips_the_seam_cannot_claim_privacy():
    model = TinyDPSynthesizer(epsilon=1.0)
    with pytest.raises(PrivacyError, match="NOT differentially private"):
        record_spent(model)
    assert record_spent(TinyDPSynthesizer()) is None


# -- Opacus wiring -------------------------------------------------------------------------------


def _toy_private(epsilon=2.0, n=64, batch_size=8, **kwargs):
    model = TinyDPSynthesizer(epsilon=epsilon)
    model.n_train_patients_ = n
    module = nn.Linear(3, 1)
    loader = DataLoader(TensorDataset(torch.randn(n, 3)), batch_size=batch_size)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    return model, module, make_private(model, module, optimizer, loader, 2, **kwargs)


def _train(module, optimizer, loader, epochs=2):
    for _ in range(epochs):
        for (x,) in loader:
            optimizer.zero_grad()
            module(x).pow(2).mean().backward()
            optimizer.step()


def test_make_private_wraps_for_dp_sgd_and_record_spent_unwraps():
    model, original, (module, optimizer, loader) = _toy_private()
    assert isinstance(loader, DPDataLoader)
    assert isinstance(loader.batch_sampler, UniformWithReplacementSampler)
    assert loader.sample_rate == pytest.approx(8 / 64)
    assert isinstance(optimizer, DPOptimizer)
    assert optimizer.max_grad_norm == 1.0
    assert module._module is original
    _train(module, optimizer, loader)
    epsilon, _ = record_spent(model)
    assert 1.5 < epsilon <= 2.0
    assert not hasattr(original, "autograd_grad_sample_hooks")
    assert not any(hasattr(p, "grad_sample") for p in original.parameters())
    with pytest.raises(PrivacyError, match="NOT differentially private"):
        record_spent(model)  # a closed session cannot be recorded twice


def test_a_custom_batch_sampler_is_replaced_by_poisson_sampling():
    model = TinyDPSynthesizer(epsilon=2.0)
    model.n_train_patients_ = 64
    module = nn.Linear(3, 1)
    buckets = [list(range(i, i + 8)) for i in range(0, 64, 8)]  # e.g. length buckets
    loader = DataLoader(TensorDataset(torch.randn(64, 3)), batch_sampler=buckets)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    _, _, private_loader = make_private(model, module, optimizer, loader, 2)
    assert isinstance(private_loader.batch_sampler, UniformWithReplacementSampler)
    assert private_loader.sample_rate == pytest.approx(1 / 8)


def test_extra_steps_are_accounted_and_flagged():
    model, _, (module, optimizer, loader) = _toy_private()
    _train(module, optimizer, loader, epochs=4)  # planned 2
    with pytest.warns(PrivacyWarning, match="more than the requested"):
        epsilon, _ = record_spent(model)
    assert epsilon > 2.0


def test_split_budget_phases_compose_within_the_target():
    model = TinyDPSynthesizer(epsilon=2.0)
    model.n_train_patients_ = 64
    spent = []
    for _ in range(2):
        module = nn.Linear(3, 1)
        loader = DataLoader(TensorDataset(torch.randn(64, 3)), batch_size=8)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        parts = make_private(model, module, optimizer, loader, 2, budget_fraction=0.5)
        _train(*parts)
        spent.append(privacy_details(model)["epsilon_by_epoch"][-1])
    epsilon, delta = record_spent(model)
    assert len(privacy_details(model)["phases"]) == 2
    # The second phase is calibrated on the composition, so the run spends its whole budget.
    assert spent[0] <= 1.0 and 1.97 < epsilon <= 2.0 * (1 + privacy.EPSILON_SLACK)
    assert delta == pytest.approx(64**-1.1)


def test_private_sum_is_a_later_phase_of_the_same_budget():
    model = TinyDPSynthesizer(epsilon=2.0)
    model.n_train_patients_ = 64
    module = nn.Linear(3, 1)
    loader = DataLoader(TensorDataset(torch.randn(64, 3)), batch_size=8)
    _train(
        *make_private(
            model,
            module,
            torch.optim.SGD(module.parameters(), lr=0.1),
            loader,
            2,
            budget_fraction=0.5,
        )
    )
    rows = np.zeros((64, 2))
    rows[:, 0] = 10.0  # scaled to norm 1: one patient moves the sum by at most 1
    sums, noise = privacy.private_sum(
        model, rows, torch.Generator().manual_seed(0), budget_fraction=0.5
    )
    epsilon, _ = record_spent(model)
    phases = privacy_details(model)["phases"]
    assert [p["budget_fraction"] for p in phases] == [0.5, 0.5]
    assert 1.97 < epsilon <= 2.0 * (1 + privacy.EPSILON_SLACK)
    assert noise == phases[1]["noise_multiplier"] > 0.5
    assert abs(sums[0] - 64) < 6 * noise and abs(sums[1]) < 6 * noise


def test_private_sum_noise_is_calibrated_to_its_share():
    def noise_at(epsilon: float) -> float:
        model = TinyDPSynthesizer(epsilon=epsilon)
        model.n_train_patients_ = 1000
        privacy.private_sum(model, np.ones((1000, 1)), torch.Generator(), budget_fraction=1.0)
        assert record_spent(model)[0] <= epsilon * (1 + privacy.EPSILON_SLACK)
        return privacy_details(model)["phases"][0]["noise_multiplier"]

    assert noise_at(0.5) > noise_at(2.0) > 0


def test_resumed_training_keeps_the_accounting_of_the_interrupted_run():
    first, _, parts = _toy_private()
    _train(*parts, epochs=1)
    saved = checkpoint_state(first)
    resumed, _, parts = _toy_private()
    restore_checkpoint_state(resumed, saved)
    _train(*parts, epochs=1)
    details = privacy_details(resumed)
    phase = details["phases"][0]
    assert phase["steps"] == 16  # 8 batches per epoch, 2 epochs in all
    whole_run = [(phase["noise_multiplier"], phase["sample_rate"], 16)]
    expected = privacy.spent_epsilon(whole_run, details["delta"])
    assert record_spent(resumed)[0] == pytest.approx(expected)
    assert 1.5 < expected <= 2.0
    assert len(details["epsilon_by_epoch"]) == 2


def test_sweep_trains_each_budget_and_tabulates(cohort, monkeypatch, tmp_path):
    import synthmed.evaluation

    class FakeReport:
        def __init__(self, synthetic):
            spent = synthetic.metadata.get("epsilon", math.inf)
            rows = [
                ("tstr_auroc", "In-hospital_death", 0.7),  # per outcome, no overall row
                ("trtr_auroc", "In-hospital_death", 0.8),
                ("next_value_mae_ratio", "HR", 3.0),
                ("next_value_mae_ratio", None, 1.5),  # the overall row wins
                ("epsilon", None, spent),
            ]
            self.scores = pd.DataFrame(
                [("utility", m, var, v, "maximize", math.nan) for m, var, v in rows],
                columns=["section", "metric", "variable", "value", "goal", "ceiling"],
            )

    monkeypatch.setattr(
        synthmed.evaluation, "evaluate", lambda real, synthetic, **kw: FakeReport(synthetic)
    )
    frame = privacy.privacy_sweep(
        cohort,
        cohort,
        model=TinyDPSynthesizer,
        epsilons=(3.0, None),
        settings={"epochs": 3},
        n_synthetic=5,
        verbose=False,
    )
    assert frame["epsilon_target"].tolist() == [3.0, math.inf]
    assert 2.5 < frame["epsilon"].iloc[0] <= 3.0
    assert math.isinf(frame["epsilon"].iloc[1])
    assert frame["tstr_auroc"].tolist() == [0.7, 0.7]
    assert frame["trtr_auroc"].tolist() == [0.8, 0.8]
    assert privacy.headline_scores(FakeReport(cohort).scores)["next_value_mae_ratio"] == 1.5
    assert frame["time_ratio"].iloc[1] == pytest.approx(1.0)
    png = privacy.plot_privacy_frontier(frame, tmp_path / "frontier.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = privacy.frontier_markdown(frame)
    assert table.count("\n") == 4 and "∞" in table


def test_unknown_accountant_is_refused():
    with pytest.raises(PrivacyError, match="accountant must be one of"):
        _toy_private(accountant="moments")


# -- provenance ----------------------------------------------------------------------------------


def test_saved_file_and_sampled_cohort_carry_epsilon_and_delta(private_model, tmp_path):
    spent = private_model.privacy_spent
    path = private_model.save(tmp_path / "model.synthmed")
    _, config, _ = read_model_file(path)
    assert config["fitted"]["privacy_spent_"] == pytest.approx(list(spent))
    loaded = load_synthesizer(path)
    assert loaded.privacy_spent == pytest.approx(spent)
    synthetic = loaded.sample(10, conditions={"In-hospital_death": 1}, seed=0)
    assert (synthetic.metadata["epsilon"], synthetic.metadata["delta"]) == pytest.approx(spent)
    assert (synthetic.static["In-hospital_death"] == 1).all()
    pd.testing.assert_frame_equal(
        synthetic.events,
        private_model.sample(10, conditions={"In-hospital_death": 1}, seed=0).events,
    )


# -- synthmed's own generators ------------------------------------------------------------------

#: Columns of a private model's saved history that depend on no real patient.
PUBLIC_HISTORY = {"epoch", "seconds", "epsilon", "learning_rate", "generator_loss"}


def _our_generator(name: str, **settings) -> Synthesizer:
    shared = {"epochs": 2, "batch_size": 24, "device": "cpu", "verbose": False, **settings}
    if name == "lstm":
        from synthmed.models.lstm import LSTMConfig, LSTMSynthesizer

        small = LSTMConfig(
            hidden_size=8,
            head_hidden=8,
            static_hidden=8,
            gap_components=2,
            mask_components=2,
            value_components=2,
            static_components=2,
        )
        return LSTMSynthesizer(small, max_length=12, **shared)
    from synthmed.models.cgan import CGANConfig, CGANSynthesizer

    small = CGANConfig(
        static_hidden=16,
        static_noise_dim=8,
        lstm_hidden=16,
        sequence_noise_dim=4,
        critic_hidden=16,
        step_embedding=4,
        max_steps=12,
    )
    return CGANSynthesizer(config=small, **shared)


@pytest.mark.parametrize("name", ["lstm", "cgan"])
def test_our_generators_train_privately_and_keep_nothing_else_from_the_data(cohort, name):
    model = _our_generator(name, epsilon=3.0).fit(cohort)
    epsilon, delta = model.privacy_spent
    assert 2.5 < epsilon <= 3.0
    assert delta == pytest.approx(N_PATIENTS**-1.1)
    assert set(model.history_.columns) <= PUBLIC_HISTORY  # no loss on real patients
    assert model.sample(5, seed=0).metadata["epsilon"] == epsilon
    if name == "lstm":  # the static model trains first, on its own share of the budget
        phases = privacy_details(model)["phases"]
        # value histograms, static model, sequence model, outcome labeller, its recalibration,
        # prevalence count
        assert [p["budget_fraction"] for p in phases] == pytest.approx(
            [0.1, 0.2, 0.3, 0.3, 0.05, 0.05]
        )
        assert all(p["steps"] == p["epochs"] * round(1 / p["sample_rate"]) for p in phases)
        # The stays' spread would be a release outside the budget: no temperature is matched.
        assert set(model.value_temperature_.values()) == {1.0}
    # Fitted on other patients (same schema and size), everything a model keeps besides its
    # weights (scalers, lengths, time scales, grids, categories) must be identical, except what
    # is fitted on a release accounted in the budget: the value scaler (both models) and the
    # LSTM's mean length.
    other = _our_generator(name, epsilon=3.0).fit(simulate_cohort(N_PATIENTS, seed=1))
    kept, kept_other = model._get_state()[0], other._get_state()[0]
    if name == "lstm":
        assert kept.pop("value_scaler") != kept_other.pop("value_scaler")
        assert kept["facts"].pop("mean_length") != kept_other["facts"].pop("mean_length")
    else:
        # At 120 patients the noise leaves one bin or none of each histogram, so the two
        # scalers may coincide; that the scaler is fitted on the release is tested in test_cgan.
        del kept["layout"]["scaler"], kept_other["layout"]["scaler"]
    assert json.dumps(kept, sort_keys=True, default=str) == json.dumps(
        kept_other, sort_keys=True, default=str
    )


def test_lstm_default_learning_rate_is_smaller_under_dp(cohort):
    private = _our_generator("lstm", epsilon=3.0, epochs=1).fit(cohort)
    public = _our_generator("lstm", epochs=1).fit(cohort)
    assert private.history_["learning_rate"].iloc[0] == pytest.approx(1e-3)
    assert public.history_["learning_rate"].iloc[0] == pytest.approx(3e-3)
    chosen = _our_generator("lstm", epsilon=3.0, epochs=1, learning_rate=0.01).fit(cohort)
    assert chosen.history_["learning_rate"].iloc[0] == pytest.approx(0.01)


# -- schema --------------------------------------------------------------------------------------


def test_inferred_bounds_are_flagged_and_missing_bounds_refused(cohort):
    inferred = Cohort(cohort.static, cohort.events)  # Schema.infer: bounds = data min/max
    with pytest.warns(PrivacyWarning, match="minimum and maximum"):
        check_public_schema(inferred)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_public_schema(cohort)  # the simulator declares physiological bounds
    unbounded = Cohort(
        cohort.static, cohort.events, cohort.schema.with_column("HR", lower=None, upper=None)
    )
    with pytest.raises(PrivacyError, match="HR"):
        check_public_schema(unbounded)


@pytest.mark.parametrize("name", ["lstm", "cgan"])
def test_private_fits_refuse_unbounded_columns_and_flag_unset_steps(cohort, name):
    unbounded = Cohort(
        cohort.static, cohort.events, cohort.schema.with_column("HR", lower=None, upper=None)
    )
    with pytest.raises(PrivacyError, match="HR"):
        _our_generator(name, epsilon=3.0, epochs=1).fit(unbounded)
    model = _our_generator(name, epsilon=3.0, epochs=1)
    if name == "lstm":
        model.max_length, setting = None, "max_length is not set"
    else:
        model.config = dataclasses.replace(model.config, max_steps=None)
        setting = "CGANConfig.max_steps is not set"
    with pytest.warns(PrivacyWarning, match=setting):
        model.fit(cohort)


def test_privacy_module_is_importable_without_side_effects():
    assert privacy.DEFAULT_ACCOUNTANT in privacy.ACCOUNTANTS

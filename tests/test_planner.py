"""The speculation planner on synthetic step-cost curves: which proposer, which K, and when none."""

import json

import pytest
import torch

from helix_serve.config import DEFAULT_DRAFT
from helix_serve.engine import planner as planner_module
from helix_serve.engine.planner import PRIORS, Choice, Options, Planner, Proposer, expected_speedup, measured_alpha
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.engine.sequence import Acceptance, Sequence
from helix_serve.engine.step_cost import DraftWork, ForwardCost, PassShape, PassTiming, StepCostModel, StepTiming

MAX_TOKENS = 2048


def seq(draft_alpha: float = 0.8, ngram_alpha: float = 0.3, evidence: float = 200.0) -> Sequence:
    s = Sequence("r", [1, 2, 3], SamplingParams(), torch.Generator())
    s.acceptance = {"draft": Acceptance(draft_alpha * evidence, evidence),
                    "ngram": Acceptance(ngram_alpha * evidence, evidence)}
    return s


def options(s: Sequence, draft: bool = True, ngram: list[int] | None = None, **kw) -> Options:
    return Options(s, base_tokens=1, room=100, draft=draft, ngram_tokens=ngram or [], **kw)


def costs(target: list[tuple[int, float]], draft_cost: float = 0.05) -> StepCostModel:
    """A target curve through the given (tokens, seconds) points; a draft pass of `draft_cost` at any width."""
    sizes, seconds = zip(*target)
    return StepCostModel(ForwardCost(list(sizes), list(seconds)), ForwardCost([1, 64], [draft_cost, draft_cost]))


MEMORY_BOUND = [(1, 1.0), (64, 1.0), (MAX_TOKENS, 32.0)]  # flat up to 64 tokens, then compute-bound
COMPUTE_BOUND = [(1, 1.0), (MAX_TOKENS, float(MAX_TOKENS))]  # every token costs a full forward


def test_expected_speedup_formula():
    assert expected_speedup(0.0, 0, 0.5) == 1.0
    assert abs(expected_speedup(0.8, 4, 0.1) - (1 - 0.8**5) / (0.2 * 1.4)) < 1e-12
    assert expected_speedup(1.0, 3, 0.0) == 4.0


def test_memory_bound_verify_and_a_good_cheap_draft_use_deep_drafts():
    [choice] = Planner(k_max=8).plan([options(seq(0.9))], costs(MEMORY_BOUND, 0.02))
    assert choice == Choice(Proposer.DRAFT, 8)


def test_compute_bound_verify_turns_speculation_off():
    """When each verified token costs a whole forward, no acceptance rate can pay for it."""
    planner = Planner(k_max=8)
    [choice] = planner.plan([options(seq(0.95), ngram=[7, 8, 9])], costs(COMPUTE_BOUND, 0.0))
    assert choice == Choice(None, 0)


def test_low_acceptance_turns_speculation_off():
    [choice] = Planner().plan([options(seq(0.05))], costs(MEMORY_BOUND, 0.3))
    assert choice == Choice(None, 0)


def test_a_plan_that_drafts_nothing_gives_way_to_new_evidence_at_once():
    """A plan drafting nothing stands for a few steps without being recomputed, but not past a change it rests
    on: the model proposer's acceptance (a probe that paid), or a prompt-lookup proposal."""
    planner, curve, s = Planner(probe_share=0.0), costs(MEMORY_BOUND, 0.3), seq(0.05, evidence=20.0)
    for _ in range(3):
        assert planner.plan([options(s)], curve) == [Choice(None, 0)]
    for _ in range(40):  # probes of the draft model that all passed
        planner.update(s, Choice(Proposer.DRAFT, 1, probe=True), 1, [4, 9], [])
    [choice] = planner.plan([options(s)], curve)
    assert choice.proposer is Proposer.DRAFT and choice.k > 1

    planner, lookup = Planner(probe_share=0.0), seq(0.05, ngram_alpha=0.95, evidence=20.0)
    assert planner.plan([options(lookup)], curve) == [Choice(None, 0)]
    assert planner.plan([options(lookup, ngram=[7, 8, 9])], curve) == [Choice(Proposer.NGRAM, 3)]


def test_under_load_a_plan_that_drafts_nothing_stands_while_requests_come_and_go(monkeypatch):
    """At a load where drafting does not pay, a request ending or arriving (another of no higher acceptance, a few
    rows fewer in a wide batch) does not make it pay: the plan stands, one for steps with a prefill and one for
    steps without. A sequence of higher acceptance, or a much smaller batch, is planned afresh."""
    priced = []
    best_plan = planner_module._StepShape.best_plan
    monkeypatch.setattr(planner_module._StepShape, "best_plan", lambda self, table: priced.append(1) or
                        best_plan(self, table))
    planner, curve = Planner(probe_share=0.0), costs(COMPUTE_BOUND, 0.3)
    batch = [seq(0.5, evidence=20.0) for _ in range(16)]
    for i, s in enumerate(batch):
        s.request_id = f"r{i}"
    newcomer = Sequence("new", list(range(20)), SamplingParams(), torch.Generator())

    def plan(seqs, admitted=()) -> list[Choice]:
        return planner.plan([options(s) for s in seqs], curve, list(admitted))

    assert plan(batch) == [Choice(None, 0)] * 16 and plan(batch[:15], [(newcomer, 20)]) == [Choice(None, 0)] * 15
    assert len(priced) == 2
    replaced = batch[1:] + [seq(0.4, evidence=20.0)]
    for step in range(3):  # ends, arrivals, prefills and a row or two fewer: no pricing
        plan(replaced[step:] if step % 2 else replaced)
        plan(batch[:14], [(newcomer, 20)])
    assert len(priced) == 2
    plan(batch[1:] + [seq(0.9, evidence=20.0)])  # a sequence that drafts better than any before
    plan(batch[:8])  # half the rows
    assert len(priced) == 4


def test_a_standing_plan_gives_way_when_a_fixed_choice_changes():
    """A fixed-K sequence that turns from prompt lookup to the draft model runs draft passes the free sequence can
    share: it drafts in exactly those steps, as a fresh plan would."""
    planner, curve = Planner(probe_share=0.0), costs(MEMORY_BOUND, 0.3)
    fixed, free = seq(0.3, ngram_alpha=0.9), seq(0.5)
    fixed.request_id, free.request_id = "fixed", "free"
    ks = []
    for step in range(4):
        lookup = [7, 8, 9, 10] if step % 2 == 0 else []
        plan = planner.plan([options(fixed, ngram=lookup, fixed_k=4), options(free)], curve)
        ks.append((plan[0].proposer, plan[1].k))
    assert ks == [(Proposer.NGRAM, 0), (Proposer.DRAFT, 4)] * 2


def test_probing_resumes_once_a_sequence_too_dear_to_probe_has_left():
    """A long sequence's draft catch-up makes its probe dearer than a whole step, so the budget never covers it;
    once it has gone, the cheap stale sequence left is probed again."""
    curve = StepCostModel(ForwardCost([1, 64, 2048], [1.0, 1.0, 32.0]), ForwardCost([1, 2048], [0.05, 50.0]))
    planner, long, short = Planner(probe_share=0.05), seq(0.05, evidence=20.0), seq(0.05, evidence=20.0)
    long.request_id, long.token_ids, short.request_id = "long", list(range(1500)), "short"
    probed = []
    for step in range(120):
        batch = [long, short] if step < 40 else [short]
        for s, choice in zip(batch, planner.plan([options(s) for s in batch], curve)):
            probed += [(step, s.request_id)] if choice.probe else []
            planner.update(s, choice, 0, [5], [])
    assert probed and all(step >= 40 and name == "short" for step, name in probed) and len(probed) >= 3


@pytest.mark.parametrize("gain, margin, drafts", [(1.06, 0.03, True), (1.02, 0.03, False), (1.02, 0.0, True)])
def test_drafting_must_beat_k0_by_the_margin(gain, margin, drafts):
    """Near break-even a few percent of cost-model error decide the sign: prompt lookup (free to propose, α 0.3)
    drafts one token only where the predicted rate beats K = 0 by the margin."""
    extra = 1.3 / gain - 1  # one verify token's cost that makes (1 + α) / (1 + extra) = gain
    curve = [(1, 1.0), (2, 1.0 + extra), (MAX_TOKENS, 1.0 + extra * (MAX_TOKENS - 1))]
    [choice] = Planner(k_max=1, margin=margin).plan([options(seq(ngram_alpha=0.3), draft=False, ngram=[7])],
                                                    costs(curve))
    assert choice == (Choice(Proposer.NGRAM, 1) if drafts else Choice(None, 0))


def test_k_shrinks_under_load_as_the_verify_pass_turns_compute_bound():
    planner, curve = Planner(k_max=8), costs(MEMORY_BOUND, 0.02)
    [alone] = planner.plan([options(seq(0.8))], curve)
    crowd = planner.plan([options(seq(0.8)) for _ in range(32)], curve)
    full = planner.plan([options(seq(0.8)) for _ in range(64)], curve)
    assert alone.k == 8
    assert 0 < sum(c.k for c in crowd) <= 64 - 32  # the flat part of the curve is shared out
    assert all(c == Choice(None, 0) for c in full)  # 64 sequences already fill it


def test_drafts_are_priced_beside_the_prefill_of_the_sequences_the_step_admits():
    """Under load a step also prefills the requests it admits; where their tokens already fill the pass's cheap
    part, each verify token costs a full forward, and the plan for the running sequences must see that."""
    curve = costs([(1, 1.0), (16, 1.0), (MAX_TOKENS, 1.0 + (MAX_TOKENS - 16))])  # flat up to 16 tokens
    newcomer = Sequence("new", list(range(20)), SamplingParams(), torch.Generator())
    running = [options(seq(ngram_alpha=0.9), draft=False, ngram=[7, 8, 9]) for _ in range(2)]
    assert Planner().plan(running, curve) == [Choice(Proposer.NGRAM, 3)] * 2
    assert Planner().plan(running, curve, [(newcomer, 14)]) == [Choice(None, 0)] * 2
    # beside a short prefill the flat part still has room for some of the drafts
    assert sum(c.k for c in Planner().plan(running, curve, [(newcomer, 10)])) == 4


@pytest.mark.parametrize("alpha, slope, drafts", [(0.6, 0.2, False), (0.95, 0.1, True)])
def test_drafts_beside_a_prefill_must_pay_at_the_decode_price(alpha, slope, drafts):
    """A prefill-bearing step takes longer per emitted token; a drafted token is still only worth what decoding one
    costs. Four rows decode in 1 s (0.25 s a token); each token past four costs `slope`, a draft pass 0.05 s. At
    α 0.6 a draft token costs 0.25 s for 0.6 tokens: no step should draft it, though beside a 20-token prefill (5 s
    for 5 tokens) it would raise that step's own rate. At α 0.95 and 0.15 s a draft token pays either way."""
    curve = costs([(1, 1.0), (4, 1.0), (MAX_TOKENS, 1.0 + slope * (MAX_TOKENS - 4))], draft_cost=0.05)
    running = [options(seq(alpha)) for _ in range(4)]
    newcomer = Sequence("new", list(range(20)), SamplingParams(), torch.Generator())
    for admitted in ([], [(newcomer, 20)]):
        choices = Planner(k_max=1).plan(running, curve, admitted)
        assert any(c.k for c in choices) == drafts, (admitted, choices)


def test_prompt_lookup_wins_where_the_text_repeats_and_needs_no_draft_pass():
    planner, curve = Planner(k_max=8), costs(MEMORY_BOUND, 0.3)
    [choice] = planner.plan([options(seq(0.5, ngram_alpha=0.9), ngram=[5, 6, 7, 8])], curve)
    assert choice == Choice(Proposer.NGRAM, 4)


def test_hybrid_batch_mixes_proposers_per_sequence():
    planner, curve = Planner(k_max=4), costs(MEMORY_BOUND, 0.05)
    repeating = options(seq(0.6, ngram_alpha=0.95), ngram=[5, 6, 7, 8])
    fresh = options(seq(0.8, ngram_alpha=0.95))  # nothing to look up
    lookup_only = options(seq(0.6, ngram_alpha=0.9), draft=False, ngram=[1, 2])  # request asked for ngram
    choices = planner.plan([repeating, fresh, lookup_only], curve)
    assert [c.proposer for c in choices] == [Proposer.NGRAM, Proposer.DRAFT, Proposer.NGRAM]
    assert choices[0].k == 4 and choices[1].k >= 1 and choices[2].k == 2


def test_fixed_k_nothing_to_propose_and_no_room_are_respected():
    planner, curve = Planner(k_max=8), costs(COMPUTE_BOUND)
    fixed = options(seq(0.1), fixed_k=3)  # a request's own K wins even when the planner would not speculate
    nothing = options(seq(0.9), draft=False)
    no_room = Options(seq(0.9), 1, room=0, draft=True, ngram_tokens=[])
    assert planner.plan([fixed, nothing, no_room], curve) == [Choice(Proposer.DRAFT, 3), Choice(None, 0),
                                                                 Choice(None, 0)]


def test_judged_sequences_always_run_the_draft_model():
    """Seeded sampling proposes K + 1 from the draft model even at K = 0 (speculative.py)."""
    [choice] = Planner().plan([options(seq(0.05), judged=True)], costs(MEMORY_BOUND, 0.3))
    assert choice == Choice(Proposer.DRAFT, 0)


def park(planner: Planner, s: Sequence, steps: int) -> None:
    for _ in range(steps):
        planner.update(s, Choice(None, 0), 0, [9], [])


def test_a_parked_sequence_probes_the_draft_once_the_budget_covers_the_probe():
    """At batch 1 a probe is cheap: it runs once the sequence is stale and 1 % of the time has paid for it."""
    planner, curve = Planner(probe_interval=4), costs(MEMORY_BOUND, 0.3)
    parked = seq(0.05)
    park(planner, parked, 3)
    assert planner.plan([options(parked)], curve) == [Choice(None, 0)]  # not stale yet
    park(planner, parked, 1)
    plans = [planner.plan([options(parked)], curve)[0] for _ in range(200)]
    first = plans.index(Choice(Proposer.DRAFT, 1, probe=True))
    # a probe adds a draft pass (0.3) and a verify token (free here): 0.3 / (1 % of 1.0 per step) = 30 steps
    assert 25 <= first <= 35
    planner.update(parked, Choice(Proposer.DRAFT, 1), 1, [4, 9], [])
    assert parked.acceptance["draft"].steps_since == 0


@pytest.mark.parametrize("curve, probed", [(costs([(1, 1.0), (MAX_TOKENS, 1.0 + (MAX_TOKENS - 1) / 32)], 0.3), True),
                                           (costs(COMPUTE_BOUND, 0.3), False)])
def test_probes_cost_at_most_their_share_of_the_time_under_load(curve, probed):
    """32 stale sequences: probing all of them would add 32 verified tokens and a 32-row draft pass; the planner
    spends no more than probe_share of the predicted time on it. Where a token costs 1/32 of a row, a draft accepted
    at PROBE_CEILING would pay, so probes run; where every token costs a whole forward no acceptance could make
    drafting pay, and nothing is probed."""
    planner = Planner(probe_interval=1)
    crowd = [seq(0.05) for _ in range(32)]
    for s in crowd:
        park(planner, s, 1)
    plain, extra, probes = 0.0, 0.0, 0
    for _ in range(300):
        choices = planner.plan([options(s) for s in crowd], curve)
        tokens = 32 + sum(c.k for c in choices)
        rows = sum(c.proposer is Proposer.DRAFT for c in choices)
        extra += curve.step_seconds(tokens, 32) - curve.step_seconds(32, 32) + (0.3 if rows else 0.0)
        plain += curve.step_seconds(32, 32)
        probes += rows
    assert (0 < probes) == probed and extra <= 0.011 * plain


def test_a_new_sequence_starts_from_the_engine_wide_acceptance():
    planner = Planner()
    fresh_before = planner.alpha(seq(evidence=0.0), Proposer.DRAFT)
    for i in range(200):  # other requests: 1 accepted of 6 judged positions every 5 steps
        planner.update(seq(evidence=0.0), Choice(Proposer.DRAFT, 4), 0 if i % 5 else 1, [1], [])
    fresh_after = planner.alpha(seq(evidence=0.0), Proposer.DRAFT)
    assert fresh_before == pytest.approx(0.5) and fresh_after < 0.3
    [choice] = planner.plan([options(seq(evidence=0.0))], costs(MEMORY_BOUND, 0.3))
    assert choice == Choice(None, 0)  # with the prior of 0.5 it would have drafted


def test_the_draft_catch_up_is_charged_to_the_plan_that_runs_the_draft():
    """A sequence whose draft lags by 500 tokens pays for the catch-up pass: the draft is not worth it there,
    though it is for the same sequence with its draft up to date."""
    planner = Planner(k_max=4)
    curve = StepCostModel(ForwardCost([1, 64, MAX_TOKENS], [1.0, 1.0, 32.0]), ForwardCost([1, 512], [0.1, 3.0]))
    synced, lagging = seq(0.6), seq(0.6)
    synced.token_ids, lagging.token_ids = list(range(600)), list(range(600))
    synced.num_draft_cached, lagging.num_draft_cached = 599, 99
    assert planner.plan([options(synced)], curve)[0].proposer is Proposer.DRAFT
    assert planner.plan([options(lagging)], curve)[0] == Choice(None, 0)


def test_prompt_lookup_is_scored_for_free_when_the_draft_model_ran():
    planner, s = Planner(), seq(0.8, ngram_alpha=0.3, evidence=2.0)
    before = planner.alpha(s, Proposer.NGRAM)
    for _ in range(10):  # lookup proposed [4, 5, 6]; the step emitted 4, 5, 6, 1: three matches
        planner.update(s, Choice(Proposer.DRAFT, 3), 3, [4, 5, 6, 1], [4, 5, 6])
    assert planner.alpha(s, Proposer.NGRAM) > before + 0.3
    for _ in range(30):  # now it proposes [2, 2, 2] and the first already misses
        planner.update(s, Choice(Proposer.DRAFT, 3), 3, [4, 5, 6, 1], [2, 2, 2])
    assert planner.alpha(s, Proposer.NGRAM) < 0.2


def test_drafts_that_are_all_or_nothing_are_planned_at_what_they_bring():
    """Prompt lookup is usually right for a whole stretch or wrong at once: half its 8-token proposals are accepted
    whole, half rejected at the first token. α (accepted ÷ judged) is then 8/9 and the geometric gains expect 4.9
    tokens from 8 where they bring 4; measured at 16 streams (int4, 2-core Xeon) such overstatement had drafting
    predicted to win 10 % where it lost 4 %. The yield brings the expectation to what the drafts brought, and at a
    break-even cost the planner stops drafting."""
    planner = Planner()
    s = seq(ngram_alpha=0.5, evidence=0.0)
    for i in range(200):
        accepted = 8 if i % 2 else 0
        planner.update(s, Choice(Proposer.NGRAM, 8), accepted, list(range(accepted + 1)), [])
    geometric = (planner.alpha(s, Proposer.NGRAM) ** torch.arange(1, 9)).sum().item()
    assert geometric > 4.6
    assert planner.gains(s, Proposer.NGRAM, 8).sum() == pytest.approx(4.0, rel=0.1)
    # any draft costs 5.5 steps (a kernel's new tile): 1 + 4 tokens in 5.5 is a loss, 1 + 4.9 a win
    curve = costs([(1, 1.0), (2, 5.5), (9, 5.5), (MAX_TOKENS, float(MAX_TOKENS))])
    assert planner.plan([options(s, draft=False, ngram=list(range(8)))], curve)[0].k == 0


def test_acceptance_recovers_after_it_improves():
    planner, curve, s = Planner(), costs(MEMORY_BOUND, 0.3), seq(0.7, evidence=0.0)
    for _ in range(10):
        planner.update(s, Choice(Proposer.DRAFT, 4), 0, [1], [])
    low = planner.plan([options(s)], curve)[0].k
    for _ in range(30):
        planner.update(s, Choice(Proposer.DRAFT, 4), 4, [1, 2, 3, 4, 5], [])
    assert planner.plan([options(s)], curve)[0].k > low


@pytest.mark.parametrize("observed", [0.5, 2.0])
def test_live_timings_scale_the_calibrated_shape(observed):
    model = costs([(1, 1.0), (64, 2.0)])
    for _ in range(60):
        model.observe(StepTiming(PassTiming(PassShape(64, 1, 0), observed * 2.0), total_s=observed * 2.0))
    assert model.target(64) == pytest.approx(observed * 2.0, rel=0.01)
    assert model.target(1) == pytest.approx(observed * 1.0, rel=0.01)  # the shape is kept


def test_configured_ratios_are_not_refreshed():
    model = StepCostModel.from_ratios(0.25, 0.1, MAX_TOKENS)
    model.observe(StepTiming(PassTiming(PassShape(5, 1, 5), 9.0), [PassTiming(PassShape(1, 1, 1), 9.0)], total_s=20))
    assert model.ratios == pytest.approx((0.25, 0.1))


# ---- EAGLE: its own proposer ----------------------------------------------------------------------


def eagle_seq(eagle_alpha: float, ngram_alpha: float = 0.3, draft_alpha: float = 0.9, evidence: float = 200.0):
    s = seq(draft_alpha, ngram_alpha, evidence)  # a draft model's α, as if learnt elsewhere: the head ignores it
    s.acceptance["eagle"] = Acceptance(eagle_alpha * evidence, evidence)
    return s


def head_costs(target: list[tuple[int, float]], head_cost: float, draft_cost: float | None = None) -> StepCostModel:
    """A target curve, the head's pass at `head_cost` and (optionally) a draft model's at `draft_cost`."""
    sizes, seconds = zip(*target)
    draft = None if draft_cost is None else ForwardCost([1, 64], [draft_cost, draft_cost])
    return StepCostModel(ForwardCost(list(sizes), list(seconds)), draft,
                         eagle=ForwardCost([1, 64], [head_cost, head_cost]))


def test_eagle_learns_its_own_acceptance_and_population_rate():
    planner = Planner(model=Proposer.EAGLE)
    s = Sequence("r", [1, 2, 3], SamplingParams(), torch.Generator())
    assert planner.alpha(s, Proposer.EAGLE) == PRIORS[Proposer.EAGLE][0] == 0.5
    planner.update(s, Choice(Proposer.EAGLE, 4), 4, [1, 2, 3, 4, 5], [])
    # 4 of 4 judged: engine-wide (4 + 0.5·4) / (4 + 4) = 0.75; the sequence's (4 + 0.75·4) / (4 + 4) = 0.875
    assert planner.prior(Proposer.EAGLE) == 0.75 and planner.alpha(s, Proposer.EAGLE) == 0.875
    assert planner.population[Proposer.DRAFT].judged == 0 and planner.alpha(s, Proposer.DRAFT) == 0.5
    assert s.acceptance["eagle"].steps_since == 0 and s.acceptance["draft"].steps_since == 1


def test_eagle_is_chosen_over_prompt_lookup_when_it_expects_more_tokens():
    planner, curve = Planner(k_max=8, model=Proposer.EAGLE), head_costs(MEMORY_BOUND, 0.02)
    [head] = planner.plan([options(eagle_seq(0.9, ngram_alpha=0.3), ngram=[5, 6, 7])], curve)
    [lookup] = planner.plan([options(eagle_seq(0.3, ngram_alpha=0.95), ngram=[5, 6, 7])], curve)
    assert head == Choice(Proposer.EAGLE, 8) and lookup == Choice(Proposer.NGRAM, 3)


def test_the_head_is_planned_on_its_own_cost_curve():
    """Same α (0.7) for the draft model and the head: a draft pass as dear as a target forward never pays,
    a head pass at 2 % of one does, deeply, on the same step-cost model."""
    curve = head_costs(MEMORY_BOUND, head_cost=0.02, draft_cost=1.0)
    s = eagle_seq(0.7, draft_alpha=0.7)
    [draft] = Planner(k_max=8, model=Proposer.DRAFT).plan([options(s)], curve)
    [eagle] = Planner(k_max=8, model=Proposer.EAGLE).plan([options(s)], curve)
    assert draft == Choice(None, 0) and eagle.proposer is Proposer.EAGLE and eagle.k >= 4


def test_the_heads_catch_up_pass_trails_by_one_token():
    s = eagle_seq(0.7)
    s.token_ids, s.num_draft_cached = list(range(600)), 560
    assert options(s).catch_up(Proposer.EAGLE) == 39 and options(s).catch_up(Proposer.DRAFT) == 40
    s.num_draft_cached = 599  # the head after drafting: entries up to n - 2; nothing left to catch up on
    assert options(s).catch_up(Proposer.EAGLE) == 1


def test_an_idle_heads_long_backlog_is_charged_as_an_investment():
    """An idle head (llm_engine.py: head_use) trails by up to IDLE_HEAD_BACKLOG tokens. Charged whole to the one
    step that would draft, catching up would never look worth it and the head would stay idle at a load where it
    pays; it is charged as HEAD_BACKLOG tokens at most (what an active head trails by)."""
    from helix_serve.engine.speculative import HEAD_BACKLOG

    s = eagle_seq(0.7)
    s.token_ids, s.num_draft_cached = list(range(600)), 99
    assert options(s).catch_up(Proposer.EAGLE) == HEAD_BACKLOG and options(s).catch_up(Proposer.DRAFT) == 501


def test_a_parked_sequence_probes_the_head_not_a_draft_model():
    planner, curve = Planner(probe_interval=4, model=Proposer.EAGLE), head_costs(MEMORY_BOUND, 0.3)
    parked = eagle_seq(0.05)
    park(planner, parked, 4)
    plans = [planner.plan([options(parked)], curve)[0] for _ in range(200)]
    assert Choice(Proposer.EAGLE, 1, probe=True) in plans and not any(c.proposer is Proposer.DRAFT for c in plans)


def test_configured_ratios_go_to_the_head_when_one_is_loaded():
    model = StepCostModel.from_ratios(0.05, 0.1, MAX_TOKENS, head=True)
    assert model.draft is None and model.ratios == pytest.approx((0.05, 0.1))
    assert model.draft_seconds(DraftWork(2, 1, 3, 10, head=True)) == pytest.approx(0.1)
    assert model.draft_seconds(DraftWork(2, 1, 3, 10)) == 0.0  # no draft model's passes to pay for


def test_the_model_proposers_prior_is_the_acceptance_measured_for_it(tmp_path):
    """`helix distill` writes the engine-measured α beside a draft (top-level) or a head (per K): the planner
    starts from it instead of the generic prior; without one (a hub id, a directory without it) nothing changes."""
    draft, head = tmp_path / "draft", tmp_path / "head"
    draft.mkdir()
    head.mkdir()
    (draft / "distill.json").write_text(json.dumps({"greedy": {"alpha": 0.21}, "t0.8": {"alpha": 0.18}}))
    (head / "distill.json").write_text(json.dumps({"evaluation": {"greedy": {"1": {"alpha": 0.4},
                                                                              "4": {"alpha": 0.35}}}}))
    assert measured_alpha(str(draft)) == 0.21 and measured_alpha(str(head)) == 0.35
    assert measured_alpha(str(tmp_path)) is None and measured_alpha("org/model") is None
    assert measured_alpha(None) is None
    planner = Planner(model=Proposer.DRAFT, model_prior=0.21)
    assert planner.prior(Proposer.DRAFT) == pytest.approx(0.21)
    assert planner.prior(Proposer.NGRAM) == pytest.approx(PRIORS[Proposer.NGRAM][0])
    assert Planner().prior(Proposer.DRAFT) == pytest.approx(PRIORS[Proposer.DRAFT][0])
    assert measured_alpha(DEFAULT_DRAFT) == pytest.approx(0.357, abs=0.01)  # the shipped draft's card

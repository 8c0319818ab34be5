"""Each step, for each sequence: which proposer drafts (none, prompt lookup, the engine's model-based proposer)
and how many tokens, chosen for the goodput of the whole step.

Proposers. Prompt lookup is always there; the model-based proposer is the draft model or an EAGLE head
(`Planner.model`): an engine loads at most one of the two, so a step runs one model's passes. The head is
its own proposer all the same — its own prior, engine-wide rate, per-sequence α and probes, and its own
cost curve in the step-cost model — so nothing learnt about one carries over to the other.
Under structured outputs the grammar is a proposer too: where it allows a single continuation (an object's
next key, closing brackets, the rest of an enum value) those tokens are drafted as given proposals. They cost
nothing to propose and the target accepts them (almost) always, so they are not the planner's choice to weigh.

Gain. A proposer accepted at rate α that drafts K tokens makes its sequence emit E(α, K) = (1 − α^(K+1)) /
(1 − α) tokens (Leviathan et al. 2023): its j-th draft token adds α^j expected tokens, less for each j.
Cost. The step-cost model (step_cost.py) predicts the whole step from its shape: the target pass over every
batched token, the model proposer's passes (the first one catching each drafting sequence up on the tokens it
has not seen; the head trails the sequence by one token, step_cost.py), processing every row of logits, and the rest.
The shape includes the prefill of the requests the step will admit (Scheduler.admissions), which the plan cannot
change but which moves where on the curve the drafts land: planned without them, at 32 streams (int4, Zen 5) the
steps that also admitted a request were predicted at 128 ms and took 169.
Choice. For each draft depth P (0 … k_max) every sequence takes the proposer that expects more tokens from
it (prompt lookup costs nothing to run but proposes only where the text repeats itself); all the possible
extra draft tokens of the batch are ranked by gain, and the prefix of that ranking with the most expected
tokens per second wins. K = 0 everywhere is a candidate like the others, so speculation switches itself off
when it does not pay, per sequence and per step, whatever the load. Drafting must beat it by `margin`: near
break-even (under load, where a verify token costs nearly what a row does) the step-cost model's few percent of
shape error decide the sign, and a step that drafts on a wrong sign loses for sure while one that does not only
misses a small gain. A plan that drafts nothing stands for QUIET_STEPS further steps while nothing it rests on
changes (`_still_quiet`): at low load K = 0 usually wins, and planning costs a few percent of a step there. What it
rests on is the load (`_Load`), not the batch: under load a request ends or arrives almost every step, and another
request of no higher acceptance does not make drafting pay where it did not.
Prefill. A step that prefills prompts (a newcomer's, or the tail a prefix-cache hit leaves) takes longer for the
tokens it emits, and priced at that step's own time per token a drafted token looks as valuable as the prefill
makes every token of the step look: traced at 4 streams (int4, Zen 5, the head alone), most drafting steps carried
a prompt tail and were planned against K = 0 steps predicted at 21–40 ms where a decode step took 12.8; the head's
engine read 0.94× of K=0 (0.97× once this rule held: it then drafted 17 tokens, not 147). A token is worth what it
costs to decode, so the plan's rate leaves the prefill's share of the step out (`_StepShape.prefill_seconds`):
drafts there must pay at the decode price.
Yield. The geometric gains overstate what drafts bring where acceptance is all-or-nothing: a prompt-lookup
proposal is usually right for a whole stretch or wrong at its first token, so α (the ratio below) is high while
the first position is a coin toss — measured at 16 streams (int4, 2-core Xeon): 14.0 tokens expected per drafting
step, 11.6 accepted, and drafting lost 4 % where it was predicted to win 10 %. So each proposer's gains are scaled
by its engine-wide yield: accepted ÷ expected over the drafts it actually ran (decayed), a correction of the
model's shape at the depths the planner picks, with their selection bias in it.
Acceptance. α is a decayed ratio of accepted to judged draft positions, per sequence and per proposer, pulled
towards the engine-wide rate of that proposer while the sequence's own evidence is thin (a new request starts
from what the proposer has been doing lately, not from a fixed guess). Before any evidence the engine-wide rate
of the model proposer is what `helix distill` measured for that draft or head with this engine (its
`distill.json`), else a generic prior. Prompt lookup is scored every step for
free ("shadow"): its proposals are compared with the tokens the step emitted, which are exact samples of the
target, so a match is a token it would have had accepted. A model proposer can only be scored by running it:
a sequence that has not used it for `probe_interval` steps gets K = 1 from it — when the probe budget allows.
The budget grows by `probe_share` of every step's predicted time (as of the last step that priced probes: pricing
them costs time too) and each probe spends what it is predicted to add to its step, so probing costs at most that
share of the time at any load (under load, where a verify token is expensive, probes become rare; at batch 1 they
are cheap and frequent). Where even an acceptance of PROBE_CEILING would not make drafting pay at the load, nothing
is probed: what a probe learns could not change a plan (int4, 32 streams, the head alone: 51 probed tokens, 27
accepted, about 0.7 % of the run as estimated from the trace).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from helix_serve.engine.sequence import Acceptance, Sequence
from helix_serve.engine.speculative import HEAD_BACKLOG
from helix_serve.engine.step_cost import DraftWork, StepCostModel
from helix_serve.model.attention import VERIFY_QUERY, gathered_context


class Proposer(str, enum.Enum):
    DRAFT = "draft"  # the draft model
    EAGLE = "eagle"  # an EAGLE head on the target's features
    NGRAM = "ngram"  # prompt lookup over the sequence's own tokens
    GRAMMAR = "grammar"  # the tokens a structured output's grammar forces next


# (α, weight in judged positions) before any evidence: the engine-wide rate starts here...
PRIORS = {Proposer.DRAFT: (0.5, 4.0), Proposer.EAGLE: (0.5, 4.0), Proposer.NGRAM: (0.3, 4.0),
          Proposer.GRAMMAR: (1.0, 4.0)}
SEQUENCE_PRIOR_WEIGHT = 4.0  # ...and a sequence's own α starts at the engine-wide rate, with this weight
POPULATION_DECAY = 0.995  # per judged step of any sequence: the engine-wide rate follows the recent requests
YIELD_PRIOR = 8.0  # expected tokens of evidence before a proposer's yield moves from 1 (module docstring)
YIELD_RANGE = (0.25, 1.25)
PROBE_CEILING = 0.9  # the model proposer's acceptance a probe could at best reveal, for `Planner._probe`
QUIET_STEPS = 8  # further steps a plan drafting nothing stands while what it rests on is unchanged (`plan`)


def measured_alpha(model_dir: str | None) -> float | None:
    """The greedy α `helix distill` measured with Helix's engine for a draft model or an EAGLE head (the
    `distill.json` beside its weights; a head's at K = 4), or None when there is none (a hub id, a file)."""
    path = Path(model_dir) / "distill.json" if model_dir else None
    if path is None or not path.is_file():
        return None
    facts = json.loads(path.read_text())
    greedy = facts.get("greedy") or (facts.get("evaluation") or {}).get("greedy") or {}
    alpha = greedy.get("alpha", greedy.get("4", {}).get("alpha"))
    return None if alpha is None else float(alpha)


def expected_speedup(alpha: float, k: int, cost_ratio: float, verify_ratio: float = 0.0) -> float:
    """Leviathan's speedup of K draft tokens at acceptance α with draft cost c per token and verify
    growth v per token (v = 0 is the paper's formula); one sequence, costs linear in K."""
    tokens = k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
    return tokens / (1.0 + k * (cost_ratio + verify_ratio))


@dataclass(slots=True)
class Options:
    """What one sequence may do this step (built by the engine from its request and state)."""

    seq: Sequence
    base_tokens: int  # tokens it puts in the target pass anyway (its uncached tokens)
    room: int  # the most draft tokens its max_tokens and the context leave
    draft: bool  # the model proposer (Planner.model) may propose
    ngram_tokens: list[int]  # prompt-lookup proposals found this step ([] when none or not allowed)
    fixed_k: int | None = None  # the request's or the engine's fixed K
    judged: bool = False  # seeded sampling: the draft model always proposes K + 1 (speculative.py)
    forced_tokens: list[int] = field(default_factory=list)  # the grammar's only continuation ([] when none)

    def catch_up(self, model: Proposer) -> int:
        """Tokens the model proposer's first pass would process for this sequence (the head's entries pair a
        position's feature with the next token, so it has one fewer to see). An idle head's backlog (up to
        IDLE_HEAD_BACKLOG tokens, speculative.py) is charged as HEAD_BACKLOG at most: catching up is an
        investment every later drafting step draws on, and charged whole to one step it never looks worth it."""
        behind = self.seq.num_tokens - self.seq.num_draft_cached - (model is Proposer.EAGLE)
        return max(min(behind, HEAD_BACKLOG) if model is Proposer.EAGLE else behind, 1)


@dataclass(slots=True)
class Choice:
    proposer: Proposer | None
    k: int
    probe: bool = False  # a K = 1 probe of the model proposer, not a draft the plan expects to pay


def _population() -> dict[Proposer, Acceptance]:
    return {p: Acceptance() for p in Proposer}


@dataclass(slots=True)
class Yield:
    """What a proposer's drafts brought against what the geometric gains expected of them (decayed)."""

    accepted: float = 0.0
    expected: float = 0.0


def _yields() -> dict[Proposer, Yield]:
    return {p: Yield() for p in Proposer}


@dataclass(slots=True)
class Planner:
    k_max: int = 8
    max_num_batched_tokens: int = 2048
    decay: float = 0.9
    probe_interval: int = 16
    probe_share: float = 0.01  # of predicted step time, spent on probing the model proposer at most
    margin: float = 0.03  # the predicted rate drafting must beat K = 0 by (module docstring)
    model: Proposer = Proposer.DRAFT  # the engine's model-based proposer: the draft model or the EAGLE head
    model_prior: float | None = None  # its measured α (measured_alpha), the engine-wide rate's starting point
    population: dict[Proposer, Acceptance] = field(default_factory=_population)
    yields: dict[Proposer, Yield] = field(default_factory=_yields)
    probe_budget_s: float = 0.0
    step_s: float = 0.0  # the predicted step when probes were last priced (`_probe`)...
    probe_price_s: float = 0.0  # ...and what the first probe would have added to it
    model_evidence: int = 0  # counts the model proposer's judged drafts: its α, prior and yield move only then
    # the last plan of a step without / with a prefill, if it drafted nothing: what it rests on (`_still_quiet`)
    quiet: dict[bool, _Quiet | None] = field(default_factory=lambda: {False: None, True: None})

    def prior(self, proposer: Proposer) -> float:
        """The engine-wide acceptance rate of a proposer (recent sequences, pulled towards PRIORS)."""
        alpha, weight = PRIORS[proposer]
        if proposer is self.model and self.model_prior is not None:
            alpha = self.model_prior
        state = self.population[proposer]
        return (state.accepted + alpha * weight) / (state.judged + weight)

    def alpha(self, seq: Sequence, proposer: Proposer) -> float:
        state = seq.acceptance[proposer.value]
        return (state.accepted + self.prior(proposer) * SEQUENCE_PRIOR_WEIGHT) / (state.judged + SEQUENCE_PRIOR_WEIGHT)

    def yield_of(self, proposer: Proposer) -> float:
        """Accepted ÷ expected tokens of this proposer's drafts lately (module docstring), 1 before evidence."""
        y = self.yields[proposer]
        return min(max((y.accepted + YIELD_PRIOR) / (y.expected + YIELD_PRIOR), YIELD_RANGE[0]), YIELD_RANGE[1])

    # ---- choosing ------------------------------------------------------------------------------

    def plan(self, options: list[Options], costs: StepCostModel,
             newcomers: list[tuple[Sequence, int]] | None = None) -> list[Choice]:
        """`newcomers`: the sequences the step will admit and the tokens each prefills (Scheduler.admissions)."""
        if not any(o.draft or o.ngram_tokens or o.forced_tokens or o.judged for o in options):
            return [Choice(None, 0)] * len(options)  # plain decoding only: nothing to choose, no one to probe
        choices: list[Choice | None] = [self._forced(o) for o in options]
        free = [options[i] for i, c in enumerate(choices) if c is None]
        shape = _StepShape.of(options, choices, self, costs, newcomers or [])
        standing = None  # the plan drafting nothing that this step follows, if any
        if free:
            load = _Load.of(free, choices, shape, self)
            if self._still_quiet(load):
                best, standing = [Choice(None, 0)] * len(free), self.quiet[load.prefill]
            else:
                best = shape.best_plan(_FreeTable.of(free, self))
                quiet = all(c.proposer is None for c in best) and load.alpha is not None
                standing = self.quiet[load.prefill] = _Quiet(load, self.model_evidence, QUIET_STEPS) if quiet else None
        slots = iter(best if free else [])
        choices = [c if c is not None else next(slots) for c in choices]
        self._probe(options, choices, shape, free, standing)  # type: ignore[arg-type]
        return choices  # type: ignore[return-value]

    def _still_quiet(self, load: _Load) -> bool:
        """Whether the last plan, which drafted nothing, still stands (`_Load.covers`): no model-proposer evidence
        since (its α, prior and yield change only then) and no more than QUIET_STEPS steps ago. Planning costs
        ~0.3–0.7 ms of numpy calls, 2–4 % of a step at low load, where K = 0 usually wins; under load, where a
        request arrives or ends almost every step, a plan that stood only for the same batch was recomputed in
        62 % of the steps (int4, 16 streams, the head alone: 1 % of the run). Steps that prefill and steps that do not
        alternate under load, and each kind has its own standing plan."""
        quiet = self.quiet[load.prefill]
        if quiet is None or quiet.left <= 0 or quiet.evidence != self.model_evidence or not quiet.load.covers(load):
            return False
        quiet.left -= 1
        return True

    def _forced(self, o: Options) -> Choice | None:
        """A choice that is not the planner's to make: grammar-forced tokens (certain, and free to propose: they
        are always worth their verify tokens), fixed K, or nothing to propose."""
        if o.forced_tokens and o.room > 0 and o.fixed_k != 0:
            return Choice(Proposer.GRAMMAR, min(len(o.forced_tokens), o.room, self.k_max))
        if o.room <= 0 or not (o.draft or o.ngram_tokens):
            return Choice(self.model if o.judged else None, 0)
        if o.fixed_k is not None:
            proposer = self._better(o, o.fixed_k)
            cap = o.fixed_k if proposer is self.model else len(o.ngram_tokens)
            k = min(o.fixed_k, cap, o.room)
            return Choice(proposer if k or o.judged else None, k)
        return None

    def _probe(self, options: list[Options], choices: list[Choice], shape: _StepShape, free: list[Options],
               standing: _Quiet | None) -> None:
        """Give the stalest sequences a K = 1 model-proposer probe, as many as the probe budget covers, unless the
        step follows a plan that drafts nothing and would draft nothing even if every free sequence's model
        proposer were accepted at PROBE_CEILING: what a probe learns could not change a plan at this load."""
        stale = sorted((i for i, (o, c) in enumerate(zip(options, choices))
                        if o.draft and o.room > 0 and o.fixed_k is None and c.proposer is None  # not in place of lookup
                        and o.seq.acceptance[self.model.value].steps_since >= self.probe_interval),
                       key=lambda i: -options[i].seq.acceptance[self.model.value].steps_since)
        affordable = self.probe_budget_s + self.probe_share * self.step_s >= min(self.probe_price_s, self.step_s)
        if self.step_s and not (stale and affordable and not (standing and self._hopeless(standing, shape, free))):
            # nothing to probe, or not yet affordable: accrue as at the last priced step, skip pricing this one
            # (a full budget prices every step: a probe dearer than a step waits for a cheaper stale sequence)
            self.probe_budget_s = min(self.probe_budget_s + self.probe_share * self.step_s, self.step_s)
            return
        seconds = shape.with_probes(options, choices, stale)  # [n + 1]: the step with the n stalest probed
        self.step_s = float(seconds[0])
        if stale:
            self.probe_price_s = float(seconds[1] - seconds[0])
        self.probe_budget_s = min(self.probe_budget_s + self.probe_share * seconds[0], seconds[0])
        # the most probes whose predicted extra time fits the budget (the extra time never falls with n)
        n = int(np.count_nonzero(np.maximum.accumulate(seconds - seconds[0]) <= self.probe_budget_s)) - 1
        if n:
            self.probe_budget_s -= seconds[n] - seconds[0]
            for i in stale[:n]:
                choices[i] = Choice(self.model, 1, probe=True)

    def _hopeless(self, quiet: _Quiet, shape: _StepShape, free: list[Options]) -> bool:
        """Whether drafting would not pay at this load even at PROBE_CEILING (asked once per standing plan)."""
        if quiet.hopeless is None:
            table = _FreeTable.of(free, self)
            table.alpha_model = np.full_like(table.alpha_model, max(PROBE_CEILING, table.alpha_model.max()))
            table.yield_model = max(table.yield_model, 1.0)
            quiet.hopeless = all(c.proposer is None for c in shape.best_plan(table))
        return quiet.hopeless

    def _better(self, o: Options, draft_depth: int) -> Proposer:
        """The proposer that expects more tokens from this sequence (prompt lookup on a tie: it is free)."""
        if not o.draft or o.judged:
            return Proposer.NGRAM if not o.judged and o.ngram_tokens else self.model
        if not o.ngram_tokens:
            return self.model
        ngram = self.gains(o.seq, Proposer.NGRAM, min(len(o.ngram_tokens), o.room)).sum()
        model = self.gains(o.seq, self.model, min(draft_depth, o.room)).sum()
        return Proposer.NGRAM if ngram >= model else self.model

    def gains(self, seq: Sequence, proposer: Proposer | None, k: int) -> np.ndarray:
        """Expected extra tokens of draft positions 1..k: α, α², ... times the proposer's yield."""
        if proposer is None:
            return np.zeros(0)
        return np.minimum(self.yield_of(proposer) * self._geometric(seq, proposer, k), 1.0)

    def _geometric(self, seq: Sequence, proposer: Proposer, k: int) -> np.ndarray:
        return self.alpha(seq, proposer) ** np.arange(1, k + 1) if k > 0 else np.zeros(0)

    # ---- learning ------------------------------------------------------------------------------

    def update(self, seq: Sequence, choice: Choice, num_accepted: int, emitted: list[int],
               ngram_tokens: list[int]) -> None:
        """Fold one step in: the proposer that ran, and prompt lookup's shadow score."""
        for state in seq.acceptance.values():
            state.steps_since += 1
        if choice.proposer is not None and choice.k > 0:
            y = self.yields[choice.proposer]  # before α learns from this step: what the plan expected
            y.expected = POPULATION_DECAY * y.expected + self._geometric(seq, choice.proposer, choice.k).sum()
            y.accepted = POPULATION_DECAY * y.accepted + num_accepted
            self._fold(choice.proposer, seq, choice.k, num_accepted)
        if ngram_tokens and choice.proposer is not Proposer.NGRAM:
            compared = min(len(ngram_tokens), len(emitted))
            matched = next((j for j in range(compared) if ngram_tokens[j] != emitted[j]), compared)
            self._fold(Proposer.NGRAM, seq, compared, matched)

    def _fold(self, proposer: Proposer, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        """Positions up to and including the first rejection were judged."""
        judged = min(num_accepted + 1, num_drafted)
        self.model_evidence += proposer is self.model
        state = seq.acceptance[proposer.value]
        state.steps_since = 0
        state.accepted = self.decay * state.accepted + num_accepted
        state.judged = self.decay * state.judged + judged
        everyone = self.population[proposer]
        everyone.accepted = POPULATION_DECAY * everyone.accepted + num_accepted
        everyone.judged = POPULATION_DECAY * everyone.judged + judged


@dataclass(slots=True)
class _StepShape:
    """The parts of a step's cost that the planner's choices do not change, and the fixed choices' share."""

    planner: Planner
    costs: StepCostModel
    rows: int  # the planned sequences and the newcomers
    context: int  # K/V positions the target's attention gathers (attention.gathered_context)
    base_tokens: int  # uncached tokens of every sequence and newcomer, plus the fixed choices' drafts
    fixed_gain: float
    fixed_k: int
    fixed_draft_rows: int
    fixed_catch_up: int
    fixed_passes: int
    prefill: bool  # a row longer than a verify row (step_cost.pass_kind): drafts do not change that
    prefill_tokens: int  # uncached tokens beyond one per row (prompts, the newcomers'): what the step prefills

    @classmethod
    def of(cls, options: list[Options], choices: list[Choice | None], planner: Planner, costs: StepCostModel,
           newcomers: list[tuple[Sequence, int]]) -> _StepShape:
        fixed = [(o, c) for o, c in zip(options, choices) if c is not None]
        drafting = [(o, c) for o, c in fixed if c.proposer is planner.model and c.k + o.judged > 0]
        fixed_k = sum(c.k for _, c in fixed)
        rows = len(options) + len(newcomers)  # a newcomer's prefill emits its first token, whatever the plan
        context = gathered_context([max(o.base_tokens, 1) for o in options] + [n for _, n in newcomers],
                                   [o.seq.num_tokens for o in options] + [seq.num_tokens for seq, _ in newcomers])
        return cls(planner, costs, rows, context,
                   sum(o.base_tokens for o in options) + sum(n for _, n in newcomers) + fixed_k,
                   float(sum(planner.gains(o.seq, c.proposer, c.k).sum() for o, c in fixed)), fixed_k,
                   len(drafting), sum(o.catch_up(planner.model) for o, _ in drafting),
                   max((c.k + o.judged for o, c in drafting), default=0),
                   max([o.base_tokens for o in options] + [n for _, n in newcomers], default=0) > VERIFY_QUERY,
                   sum(max(o.base_tokens - 1, 0) for o in options) + sum(n - 1 for _, n in newcomers))

    def step_seconds(self, drafted: np.ndarray, draft_rows: np.ndarray, catch_up: np.ndarray,
                     passes: np.ndarray, prefilled: bool = True) -> np.ndarray:
        """`prefilled=False`: the same step without its prefill (`prefill_seconds`)."""
        draft_rows, catch_up = draft_rows + self.fixed_draft_rows, catch_up + self.fixed_catch_up
        passes = np.maximum(passes, self.fixed_passes)
        longest = self.context // max(self.rows, 1)
        work = DraftWork(passes, draft_rows, catch_up, draft_rows * longest, self.planner.model is Proposer.EAGLE)
        base = self.base_tokens if prefilled else self.base_tokens - self.prefill_tokens
        return self.costs.step_seconds(base + drafted, self.rows, self.context, work, self.fixed_k + drafted,
                                       self.prefill and prefilled)

    def prefill_seconds(self) -> float:
        """What the step's prefill adds to its K = 0 time: the same whatever the plan, and no measure of what a
        token is worth (`best_plan`)."""
        if not self.prefill_tokens:
            return 0.0
        zero = np.zeros(1, np.int64)
        return max(float(self.step_seconds(zero, zero, zero, zero)[0] - self.step_seconds(zero, zero, zero, zero,
                                                                                          False)[0]), 0.0)

    def with_probes(self, options: list[Options], choices: list[Choice], stale: list[int]) -> np.ndarray:
        """The predicted time of a step with these choices (the fixed ones included), and with a K = 1 probe of
        the model proposer added for the first n of `stale` (sequences that draft nothing), n = 0 … len(stale)."""
        model = self.planner.model
        drafting = [(o, c) for o, c in zip(options, choices) if c.proposer is model and c.k + o.judged > 0]
        probes = np.arange(len(stale) + 1)
        total_k = sum(c.k for c in choices) + probes
        catch_up = sum(o.catch_up(model) for o, _ in drafting) + np.cumsum([0] + [options[i].catch_up(model)
                                                                            for i in stale])
        rows = len(drafting) + probes
        passes = np.maximum(max((c.k + o.judged for o, c in drafting), default=0), np.minimum(probes, 1))
        longest = self.context // max(self.rows, 1)
        work = DraftWork(passes, rows, catch_up, rows * longest, model is Proposer.EAGLE)
        base = self.base_tokens - self.fixed_k
        return np.asarray(self.costs.step_seconds(base + total_k, self.rows, self.context, work, total_k,
                                                  self.prefill), float)

    def best_plan(self, table: _FreeTable) -> list[Choice]:
        """Each free sequence's choice. At every draft depth the free sequences' extra tokens are ranked by gain,
        and of every prefix of every ranking the one with the most expected tokens per second wins. All depths
        are evaluated at once: a loop over them spent ~0.15 ms of numpy call overhead per depth, a few percent of
        a step at low load. A sequence's gains fall with the position, so its tokens enter a ranking in order,
        and a prefix's drafting rows, catch-up and passes are running counts over the ranking."""
        depths = np.arange(table.k_max + 1 if table.may_draft.any() else 1)
        proposers, caps = table.picks(depths)  # [D, F]
        model = proposers == _MODEL
        alphas = np.where(model, table.alpha_model, table.alpha_ngram)
        yields = np.where(model, table.yield_model, table.yield_ngram)
        positions = np.arange(1, max(int(caps.max(initial=0)), 1) + 1)  # [J]
        gains = np.minimum(yields[..., None] * alphas[..., None] ** positions, 1.0)  # [D, F, J]
        taken = positions <= caps[..., None]
        num_depths, num_free, width = gains.shape
        budget = max(self.planner.max_num_batched_tokens - self.base_tokens, 0)
        flat = np.where(taken, gains, -np.inf).reshape(num_depths, -1)
        most = min(budget, int(taken.sum((1, 2)).max()))  # the longest ranking worth pricing
        order = np.argsort(-flat, axis=1, kind="stable")[:, :most]  # [D, M]: ties keep position order
        ranked = np.take_along_axis(flat, order, 1)
        valid = ranked > -np.inf  # the taken tokens come first
        owner, position = np.divmod(order, width)
        position += 1
        judged = table.judged[owner]
        by_model = np.take_along_axis(model, owner, 1) & valid
        starts = by_model & (position == 1) & ~judged  # the row's first draft token: its draft passes start
        always = model & table.judged  # judged rows propose one token more: they run the draft even at K = 0

        def running(per_token: np.ndarray, at_start: np.ndarray) -> np.ndarray:  # [D, M] → [D, M + 1]
            return at_start[:, None] + np.concatenate((np.zeros((num_depths, 1)), np.cumsum(per_token, 1)), 1)

        expected = running(np.where(valid, ranked, 0.0), np.full(num_depths, self.rows + self.fixed_gain))
        draft_rows = running(starts, always.sum(1))
        catch_up = running(np.where(starts, table.catch_up[owner], 0), (always * table.catch_up).sum(1))
        depth_reached = np.concatenate((np.zeros((num_depths, 1)), np.where(by_model, position + judged, 0)), 1)
        passes = np.maximum(np.maximum.accumulate(depth_reached, 1), always.max(1, initial=False)[:, None])
        drafted = np.broadcast_to(np.arange(order.shape[1] + 1), expected.shape)
        seconds = self.step_seconds(*(a.ravel().astype(np.int64) for a in (drafted, draft_rows, catch_up, passes)))
        # A drafted token is worth what decoding one costs: the prefill's share of the step is left out of the
        # rate (module docstring, Prefill).
        rate = expected / (np.reshape(seconds, expected.shape) - self.prefill_seconds())
        rate[:, 1:] = np.where(valid, rate[:, 1:] / (1 + self.planner.margin), -np.inf)  # prefix 0: K = 0
        depth, m = np.unravel_index(int(np.argmax(rate)), rate.shape)  # ties: the shallowest, shortest
        ks = np.bincount(owner[depth, :m], minlength=num_free)
        named = {_NONE: None, _MODEL: self.planner.model, _NGRAM: Proposer.NGRAM}
        return [Choice(named[p] if k or j else None, int(k)) for p, k, j in zip(proposers[depth], ks, table.judged)]


@dataclass(slots=True)
class _Load:
    """What a plan that drafts nothing rests on, besides the model proposer's evidence: how many rows the step has,
    whether it prefills, and the best acceptance among its free sequences (None where one of them has a prompt-lookup
    proposal or a fixed choice drafts: those are planned every step)."""

    rows: int
    prefill: bool
    alpha: float | None

    @classmethod
    def of(cls, free: list[Options], choices: list[Choice | None], shape: _StepShape, planner: Planner) -> _Load:
        fixed_drafts = any(c is not None and c.proposer is not None for c in choices)
        alpha = None if fixed_drafts or any(o.ngram_tokens for o in free) else \
            max((planner.alpha(o.seq, planner.model) for o in free if o.draft), default=0.0)
        return cls(shape.rows, shape.prefill_tokens > 0, alpha)

    def covers(self, now: _Load) -> bool:
        """Drafting did not pay at this load, so it does not at `now`'s: no more acceptance, as many rows (a few
        fewer in a wide batch: a verify token is no cheaper there), and a prefill in both or neither (a draft beside
        a prefill lands on a wider pass)."""
        if self.alpha is None or now.alpha is None:
            return False
        return now.alpha <= self.alpha and now.rows >= self.rows - self.rows // 8 and now.prefill == self.prefill


@dataclass(slots=True)
class _Quiet:
    load: _Load
    evidence: int  # Planner.model_evidence when it was planned
    left: int  # steps it may still stand
    hopeless: bool | None = None  # drafting would not pay even at PROBE_CEILING (`Planner._hopeless`), once asked


_NONE, _MODEL, _NGRAM = 0, 1, 2  # proposer codes in the vectorised tables (_MODEL: Planner.model)


def _gain_sum(alpha: np.ndarray, k: np.ndarray) -> np.ndarray:
    """α + α² + … + α^k, elementwise."""
    return np.where(alpha < 1.0, alpha * (1 - alpha ** k) / np.maximum(1 - alpha, 1e-12), k * 1.0)


@dataclass(slots=True)
class _FreeTable:
    """The free sequences' options as arrays, for choosing over all of them at once."""

    alpha_model: np.ndarray  # [F] the model proposer's α
    alpha_ngram: np.ndarray
    may_draft: np.ndarray  # bool
    judged: np.ndarray  # bool
    ngram_k: np.ndarray  # prompt-lookup proposals usable (room and k_max applied)
    room: np.ndarray
    catch_up: np.ndarray
    k_max: int
    yield_model: float
    yield_ngram: float

    @classmethod
    def of(cls, free: list[Options], planner: Planner) -> _FreeTable:
        room = np.array([min(o.room, planner.k_max) for o in free])
        return cls(np.array([planner.alpha(o.seq, planner.model) for o in free]),
                   np.array([planner.alpha(o.seq, Proposer.NGRAM) for o in free]),
                   np.array([o.draft for o in free]), np.array([o.judged for o in free]),
                   np.minimum([len(o.ngram_tokens) for o in free], room), room,
                   np.array([o.catch_up(planner.model) for o in free]), planner.k_max,
                   planner.yield_of(planner.model), planner.yield_of(Proposer.NGRAM))

    def picks(self, depths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[D, F] each sequence's proposer code and most draft tokens at each draft depth: the proposer that
        expects more tokens (prompt lookup on a tie: it is free); at depth 0 only prompt lookup (judged rows:
        the model)."""
        depth = depths[:, None]
        draft_k = np.minimum(depth, self.room)
        ngram_wins = (self.yield_ngram * _gain_sum(self.alpha_ngram, self.ngram_k)
                      >= self.yield_model * _gain_sum(self.alpha_model, draft_k))
        has_ngram = self.ngram_k > 0
        use_ngram = ~self.judged & has_ngram & (~self.may_draft | ngram_wins | (depth == 0))
        use_draft = ~use_ngram & ((self.may_draft & (depth > 0)) | self.judged)
        proposers = np.where(use_ngram, _NGRAM, np.where(use_draft, _MODEL, _NONE))
        caps = np.where(use_ngram, self.ngram_k, np.where(use_draft, draft_k, 0))
        return proposers, caps

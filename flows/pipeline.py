"""PrefFlow: OpenAssistant-2 -> SFT -> preference optimisation (loss by name) -> AlpacaEval 2 -> results table.
Each step is a few lines calling ``steps/``; resources and deployment decorators come from the config
(flows/mutators.py). ``python flows/pipeline.py run --loss dpo``; see README.md for more."""

import sys

from metaflow import FlowSpec, Parameter, card, current, parallel, retry, step
from mutators import deployment_from_config, package_steps_library, run_config_option

from steps.config import parse_config_text


@package_steps_library
@deployment_from_config
class PrefFlow(FlowSpec):
    """Align a language model with preference data and score it with AlpacaEval 2."""

    config = run_config_option(parse_config_text, "run config YAML (see configs/); validated before any work")
    loss = Parameter(
        "loss",
        type=str,
        default="",
        help="preference loss(es), comma-separated (dpo, simpo, orpo, cpo, ipo, hinge, kto), or 'sft'; "
        "default: the config's preference.criterion",
    )
    set = Parameter(
        "set",
        type=str,
        default="",
        help="config overrides, space-separated key.path=value (e.g. preference.criterion_config.beta=0.5)",
    )
    sweep = Parameter(
        "sweep",
        type=str,
        default="",
        help="a sweep file (configs/sweeps/*.yaml): one preference run per grid point, sharing one SFT",
    )

    @step
    def start(self):
        """Type the config once (with --set), pick losses and sweep points, resolve each variant's config."""
        from steps.pipeline import handoff_location, plan_run

        plan, self.output_root = plan_run(
            self.config, self.loss, self.set, self.sweep, current.flow_name, current.run_id
        )
        self.cfg, self.losses, self.variants = plan.config, plan.losses, plan.variants
        self.num_nodes = self.cfg.resources.num_nodes
        # one_node: reference_outputs -> sft -> preference -> evaluate, as always. gang (num_nodes > 1): @parallel
        # gangs, reference_outputs -> sft_gang -> sft_nodes (N tasks) -> sft_gang_join -> sft, and per variant
        # preference -> preference_gang -> preference_nodes -> preference_gang_join -> evaluate; sft and preference
        # then only pass the gang's model on. A variant with preference.on_policy (a pair loss): preference ->
        # onpolicy_round (a task per round, looping) -> evaluate, which passes the last round's result on.
        self.layout = "gang" if self.num_nodes > 1 else "one_node"
        self.handoff = handoff_location(self.cfg, self.output_root, current.flow_name)
        self.next(self.prepare_data)

    @step
    def prepare_data(self):
        """OpenAssistant-2 -> SFT examples and ranked preference pairs (chat and fairseq2 forms)."""
        from steps.pipeline import prepare_data, step_context

        self.data_dir, self.data_stats = prepare_data(step_context(self.cfg, self.output_root, self.handoff))
        self.next(self.reference_outputs)

    @step
    def reference_outputs(self):
        """The eval set and its reference outputs (the eval set's own, or the starting model's)."""
        from steps.pipeline import reference_outputs, step_context

        ctx = step_context(self.cfg, self.output_root, self.handoff)
        self.eval_set_info, self.reference_outputs_path = reference_outputs(ctx)
        self.next({"one_node": self.sft, "gang": self.sft_gang}, condition="layout")

    @step
    def sft_gang(self):
        """Start SFT on a gang of ``resources.num_nodes`` nodes."""
        self.next(self.sft_nodes, num_parallel=self.num_nodes)

    @retry(times=1)
    @parallel
    @step
    def sft_nodes(self):
        """One node of the SFT gang (torchrun on each; every node resumes from the last checkpoint on retry)."""
        from steps.pipeline import current_gang, step_context, train_sft

        gang = current_gang(self.cfg.resources.master_port)  # this node's place, from current.parallel
        self.sft_summary = train_sft(step_context(self.cfg, self.output_root, self.handoff, gang), self.data_dir)
        self.next(self.sft_gang_join)

    @step
    def sft_gang_join(self, inputs):
        """Node 0's result: the gang's global rank 0 wrote the model and the metrics."""
        from steps.pipeline import gang_summary

        self.sft_summary = gang_summary([i.sft_summary for i in inputs], inputs[0].cfg.sft.enabled, "sft")
        self.merge_artifacts(inputs, exclude=["sft_summary"])
        self.next(self.sft)

    @card(type="blank", id="training")
    @retry(times=1)
    @step
    def sft(self):
        """Supervised fine-tuning (resumes from its last checkpoint on retry); after a gang, its model."""
        from steps.cards import training_card
        from steps.pipeline import step_context, train_sft

        if self.layout == "one_node":
            self.sft_summary = train_sft(step_context(self.cfg, self.output_root, self.handoff), self.data_dir)
        current.card.extend(training_card(self.sft_summary, "sft"))
        self.next(self.preference, foreach="variants")

    @card(type="blank", id="training")
    @retry(times=1)
    @step
    def preference(self):
        """One preference run per variant (loss or sweep point); the 'sft' variant carries the SFT model."""
        from steps.cards import training_card
        from steps.pipeline import step_context, train_variant, variant_route

        self.plan = self.input
        self.variant = self.plan.variant.as_dict()  # plain, for the report
        self.route = variant_route(self.layout, self.plan)  # one_node, gang, or rounds (on-policy)
        if self.route == "one_node":
            ctx = step_context(self.plan.config, self.output_root, self.handoff)
            self.train_summary = train_variant(ctx, self.plan, self.data_dir, self.sft_summary)
            current.card.extend(training_card(self.train_summary, self.plan.name))
        self.round_outcomes = []  # on-policy rounds: one RoundOutcome per round done
        self.next(
            {"one_node": self.evaluate, "gang": self.preference_gang, "rounds": self.onpolicy_round}, condition="route"
        )

    @card(type="blank", id="round")
    @retry(times=1)
    @step
    def onpolicy_round(self):
        """One on-policy round (a task per round): sample from the current policy, judge, pair, train, evaluate."""
        from steps.onpolicy.flow_round import round_card, run_round
        from steps.pipeline import step_context

        ctx = step_context(self.plan.config, self.output_root, self.handoff)
        done = run_round(
            ctx, self.plan, self.round_outcomes, self.data_dir, self.sft_summary, self.reference_outputs_path
        )
        self.round_outcomes = [*self.round_outcomes, done]
        current.card.extend(round_card(done))
        self.round_route = "again" if done.round < self.plan.config.preference.on_policy.rounds else "done"
        self.next({"again": self.onpolicy_round, "done": self.evaluate}, condition="round_route")

    @step
    def preference_gang(self):
        """Start this variant's preference run on a gang of ``resources.num_nodes`` nodes."""
        self.next(self.preference_nodes, num_parallel=self.num_nodes)

    @retry(times=1)
    @parallel
    @step
    def preference_nodes(self):
        """One node of this variant's gang."""
        from steps.pipeline import current_gang, step_context, train_variant

        gang = current_gang(self.plan.config.resources.master_port)
        ctx = step_context(self.plan.config, self.output_root, self.handoff, gang)
        self.train_summary = train_variant(ctx, self.plan, self.data_dir, self.sft_summary)
        self.next(self.preference_gang_join)

    @card(type="blank", id="training")
    @step
    def preference_gang_join(self, inputs):
        """Node 0's result (global rank 0 wrote the model)."""
        from steps.cards import training_card
        from steps.pipeline import gang_summary

        self.train_summary = gang_summary([i.train_summary for i in inputs], True, inputs[0].plan.name)
        self.merge_artifacts(inputs, exclude=["train_summary"])
        current.card.extend(training_card(self.train_summary, self.plan.name))
        self.next(self.evaluate)

    @card(type="blank", id="evaluation")
    @retry(times=1)
    @step
    def evaluate(self):
        """AlpacaEval 2: generate, judge against the reference, LC WR and WR (after on-policy rounds, each round's
        task evaluated its model: the last round's stands for the variant, the join reads every round's)."""
        from steps.cards import evaluation_card
        from steps.pipeline import evaluate_variant, step_context

        if self.round_outcomes:
            self.train_summary, self.result = self.round_outcomes[-1].train, self.round_outcomes[-1].result
        else:
            ctx = step_context(self.plan.config, self.output_root, self.handoff)
            self.result = evaluate_variant(
                ctx, self.plan, self.train_summary, self.reference_outputs_path, self.data_dir
            )
        current.card.extend(evaluation_card(self.result))
        self.next(self.join)

    @card(type="blank", id="results")
    @step
    def join(self, inputs):
        """Collect every model's result; ``run_config`` is the typed config as plain values (for the report)."""
        from steps.cards import results_card
        from steps.pipeline import branch_models, collect_results, step_context

        self.merge_artifacts(
            inputs,
            include=[
                "cfg",
                "losses",
                "data_stats",
                "eval_set_info",
                "sft_summary",
                "output_root",
                "data_dir",
                "handoff",
            ],
        )
        self.run_config = self.cfg.to_dict()
        ctx = step_context(self.cfg, self.output_root, self.handoff)
        # a variant trained in on-policy rounds gives one row per round
        models = [m for i in inputs for m in branch_models(i.round_outcomes, i.result, i.train_summary)]
        self.results = collect_results(ctx, [m[0] for m in models], [m[1] for m in models])
        current.card.extend(results_card(self.results, current.flow_name, current.run_id))
        self.next(self.report)

    @card(type="blank", id="report")
    @step
    def report(self):
        """Regenerate the results report from Metaflow's records, this run included (its end has not run yet)."""
        from steps.report import report_in_step

        self.report_files = report_in_step()
        self.next(self.end)

    @step
    def end(self):
        """Print the results table."""
        from steps.pipeline import print_results

        print_results(self.results, current.flow_name, current.run_id)


if __name__ == "__main__":
    import os

    from steps.config import ensure_user_name, preflight
    from steps.train.gang import put_own_python_first

    ensure_user_name()
    # Metaflow's local runtime starts a gang's other nodes as `python flow.py step ...` from PATH: make that this
    # interpreter where its directory has one (the preflight stops a local gang with one line where it cannot)
    put_own_python_first(os.environ)
    if code := preflight(sys.argv[1:]):
        sys.exit(code)
    PrefFlow()

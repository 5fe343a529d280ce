"""PrefFlow: OpenAssistant-2 data -> SFT -> preference optimisation (loss by name) -> AlpacaEval 2 -> results.

    python flows/pipeline.py run --loss dpo
    python flows/pipeline.py run --loss dpo,simpo,orpo          # one SFT, three preference runs
    python flows/pipeline.py run --loss sft                     # SFT only
    python flows/pipeline.py --config config configs/llama3_1_8b/dpo.yaml run
    python flows/pipeline.py run --loss simpo --set "preference.criterion_config.beta=2.5 sft.epochs=2"

Each step is a few lines that call ``steps/``; heavy imports (torch, transformers) happen inside them.
"""
from pathlib import Path

from metaflow import Config, FlowSpec, Parameter, card, current, resources, retry, step

from mutators import deployment_from_config
from steps.pipeline import parse_config_text

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")


@deployment_from_config
class PrefFlow(FlowSpec):
    """Align a language model with preference data and score it with AlpacaEval 2."""

    config = Config("config", default=DEFAULT_CONFIG, parser=parse_config_text,
                    help="run config YAML (see configs/); validated before any work")
    loss = Parameter("loss", type=str, default="",
                     help="preference loss(es), comma-separated (dpo, simpo, orpo, cpo, ipo, hinge), or 'sft'; "
                          "default: the config's preference.criterion")
    set = Parameter("set", type=str, default="",
                    help="config overrides, space-separated key.path=value (e.g. preference.criterion_config.beta=0.5)")
    sweep = Parameter("sweep", type=str, default="",
                      help="a sweep file (configs/sweeps/*.yaml): one preference run per grid point, sharing one SFT")

    @step
    def start(self):
        """Validate the config, overrides and losses before any work."""
        from steps.pipeline import plan_run

        self.run_config, self.losses, self.variants, self.output_root = plan_run(
            dict(self.config), self.loss, self.set, current.flow_name, current.run_id, self.sweep)
        self.next(self.prepare_data)

    @step
    def prepare_data(self):
        """OpenAssistant-2 -> SFT examples and ranked preference pairs (chat and fairseq2 forms)."""
        from steps.pipeline import prepare_data

        self.data_dir, self.data_stats = prepare_data(self.run_config, self.output_root)
        self.next(self.reference_outputs)

    @resources(cpu=config.resources.evaluate.cpu, memory=config.resources.evaluate.memory,
               gpu=config.resources.evaluate.gpu)
    @step
    def reference_outputs(self):
        """The eval set and its reference outputs (the eval set's own, or the starting model's)."""
        from steps.pipeline import reference_outputs

        self.eval_set_info, self.reference_outputs_path = reference_outputs(self.run_config, self.output_root)
        self.next(self.sft)

    @card(type="blank", id="training")
    @retry(times=1)
    @resources(cpu=config.resources.train.cpu, memory=config.resources.train.memory, gpu=config.resources.train.gpu)
    @step
    def sft(self):
        """Supervised fine-tuning (resumes from its last checkpoint on retry)."""
        from steps.cards import training_card
        from steps.pipeline import train_sft

        self.sft_summary = train_sft(self.run_config, self.data_dir, self.output_root)
        current.card.extend(training_card(self.sft_summary))
        self.next(self.preference, foreach="variants")

    @card(type="blank", id="training")
    @retry(times=1)
    @resources(cpu=config.resources.train.cpu, memory=config.resources.train.memory, gpu=config.resources.train.gpu)
    @step
    def preference(self):
        """One preference run per variant (loss or sweep point); the 'sft' variant carries the SFT model."""
        from steps.cards import training_card
        from steps.pipeline import train_variant

        self.variant = self.input
        self.train_summary = train_variant(self.run_config, self.variant, self.data_dir, self.output_root,
                                           self.sft_summary)
        current.card.extend(training_card(self.train_summary))
        self.next(self.evaluate)

    @card(type="blank", id="evaluation")
    @retry(times=1)
    @resources(cpu=config.resources.evaluate.cpu, memory=config.resources.evaluate.memory,
               gpu=config.resources.evaluate.gpu)
    @step
    def evaluate(self):
        """AlpacaEval 2: generate, judge against the reference, LC WR and WR."""
        from steps.cards import evaluation_card
        from steps.pipeline import evaluate_variant

        self.result = evaluate_variant(self.run_config, self.variant, self.train_summary,
                                       self.reference_outputs_path, self.eval_set_info, self.output_root)
        current.card.extend(evaluation_card(self.result))
        self.next(self.join)

    @card(type="blank", id="results")
    @step
    def join(self, inputs):
        """Collect every model's result."""
        from steps.cards import results_card
        from steps.pipeline import collect_results

        self.merge_artifacts(inputs, include=["run_config", "losses", "data_stats", "eval_set_info", "sft_summary",
                                              "output_root", "data_dir"])
        self.results = collect_results([i.result for i in inputs], [i.train_summary for i in inputs])
        current.card.extend(results_card(self.results))
        self.next(self.report)

    @card(type="blank", id="report")
    @step
    def report(self):
        """Regenerate the results report from Metaflow's records, this run included (its end has not run yet)."""
        from steps.report import report_card, report_for_current_run

        paths = report_for_current_run()
        current.card.extend(report_card(paths, f"{current.flow_name}/{current.run_id}"))
        self.report_files = paths.to_dict()
        self.next(self.end)

    @step
    def end(self):
        """Print the results table."""
        from steps.pipeline import print_results

        print_results(self.results)


if __name__ == "__main__":
    PrefFlow()

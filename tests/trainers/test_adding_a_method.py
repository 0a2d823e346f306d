"""``docs/adding-a-method.md``, followed for one existing method: a copy of MaPO written outside the package
exactly as the guide says (config dataclass, loss on the shared objective, ``@register_method``), registered
by importing its module before the recipe loads, trains to the built-in ``mapo``'s numbers step for step.

It runs in a subprocess: registering a method changes the process's registry, which other tests read.
"""

import json
import subprocess
import sys
import textwrap

import yaml

MY_METHOD = textwrap.dedent('''
    from dataclasses import dataclass

    from diffalign.objectives import mapo_loss
    from diffalign.trainers.method import Method, StepOutput, TrainBatch, register_method, weighted_mean


    @dataclass
    class MyMaPOConfig:
        """MaPO, again (docs/adding-a-method.md, step 2)."""

        beta: float = 0.1
        snr_value: float = 0.5


    @register_method("my-mapo", MyMaPOConfig, kind="offline")
    class MyMaPO(Method):
        uses_reference = False

        def loss(self, batch: TrainBatch) -> StepOutput:
            ew, el = self.errors(batch).chunk(2)
            T = getattr(self.backbone.forward_process, "num_train_timesteps", 1000)
            losses, logits = mapo_loss(ew, el, beta=self.config.beta, snr_value=self.config.snr_value,
                                       num_train_timesteps=T)
            logits = logits.detach()
            return StepOutput(weighted_mean(losses, batch.weights),
                              {"implicit_acc": (logits > 0).float().mean() + 0.5 * (logits == 0).float().mean(),
                               "margin": logits.mean()})
''')

RUN = textwrap.dedent('''
    import json, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    import my_method  # noqa: F401  (step 4: importing the module registers the method)
    from diffalign.trainers.registry import load_recipe, run_recipe

    model, data, out = sys.argv[2:5]
    common = [f"model.pretrained={model}", "model.lora_rank=4", f"data.source={data}", "data.resolution=32",
              "train.batch_size=2", "train.max_steps=3", "train.learning_rate=1e-3", "train.checkpointing_steps=0"]
    for name in ("mapo", "my-mapo"):
        run = run_recipe(load_recipe(None, [f"method.name={name}", f"train.output_dir={out}/{name}", *common]))
        print(json.dumps({"name": name, "run": str(run)}))
''')


def test_a_method_written_as_the_guide_says_trains_like_the_builtin_one(tiny_models, pair_parquet, tmp_path):
    (tmp_path / "my_method.py").write_text(MY_METHOD)
    (tmp_path / "run.py").write_text(RUN)
    out = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path), str(tiny_models["sd"]),
                          str(pair_parquet), str(tmp_path / "runs")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = {r["name"]: r["run"] for r in map(json.loads, [x for x in out.stdout.splitlines() if x.startswith("{")])}

    def metrics(name):
        return [json.loads(x) for x in open(f"{runs[name]}/metrics.jsonl").read().splitlines()]

    builtin, mine = metrics("mapo"), metrics("my-mapo")
    assert [r["step"] for r in mine] == [1, 2, 3]
    assert [r["loss"] for r in mine] == [r["loss"] for r in builtin]  # the same batches, noise, loss, updates
    assert [r["margin"] for r in mine] == [r["margin"] for r in builtin]
    written = yaml.safe_load(open(f"{runs['my-mapo']}/config.yaml").read())
    assert written["method"] == {"name": "my-mapo", "beta": 0.1, "snr_value": 0.5}  # defaults written out
    assert (tmp_path / "runs" / "my-mapo" / "final" / "pytorch_lora_weights.safetensors").is_file()

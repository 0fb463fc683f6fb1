"""The comparison as markdown: a section per test set, the main split
first, with the methods' costs beside their main-split numbers."""

from typing import Optional

# The ablation's cells and lines: one format for both experiments' tables.
from medbridge_jax.ablation import tables as fmt

MEMORY_KINDS = {"device": "device", "host_rss": "host RSS"}


def markdown(result: dict) -> str:
  """compare.md: the header, then per test set the methods' table, the
  spread over seeds (several seeds) and the per-label AUROC."""
  if not result["sets"]:
    return "No finished comparison runs.\n"
  out = _intro(result)
  for k, numbers in enumerate(result["sets"]):
    out += _section(result, numbers, main=k == 0)
  out += fmt.stopped(result)
  return "\n".join(out) + "\n"


def _intro(result: dict) -> list[str]:
  c, main = result["config"], result["sets"][0]
  facts = fmt.facts(
      c, result["seeds"], main["set"], main["selected_on"])
  out = ["# MedBridge against VLM adaptation methods", "",
         f"Machine: {result['machine']['line']}. Date: {result['date']}. "
         f"Config: {result['config_spec']}.",
         facts + " Every method trains with the same seeds, data and "
         "frozen experts, in <method>/seed<s> of this folder; a run "
         "finished before is reused with the costs measured when it "
         "trained.", "", "Methods:", ""]
  for name, what in result["methods"].items():
    tag = " (reference)" if name == result["reference"] else ""
    out.append(f"- {name}{tag}: {what.removeprefix(name + ': ')}")
  return out


def _section(result: dict, numbers: dict, main: bool) -> list[str]:
  c, ref = result["config"], result["reference"]
  labels = ", ".join(c["eval"]["mean_labels"]) or "all labels"
  out = ["", (f"## Test split: {numbers['set']}" if main
              else f"## Extra test set: {numbers['set']}"), "",
         f"Mean AUROC over {labels} with its 95% patient-level bootstrap "
         f"interval; Δ: the method's mean AUROC minus {ref}'s on the same "
         f"images and seed, with a 95% patient-level paired bootstrap "
         f"interval "
         f"({c['eval']['bootstrap']} resamples each).", ""]
  cost_of = {(x["method"], x["seed"]): x for x in result["costs"]}
  columns = ["Method", "Seed", "Mean AUROC [95% CI]",
          f"Δ vs {ref} [paired 95% CI]"]
  if main:
    columns += ["Trainable params", "Frozen params", "Train images/s",
             "Peak memory"]
  out += fmt.head(columns)
  for r in numbers["rows"]:
    cells = [r["method"], str(r["seed"]), _with_ci(r["mean_auroc"],
                                                   r["mean_auroc_ci"]),
             fmt.diff(r["vs_reference"]) if r["vs_reference"] else
             ("reference" if r["method"] == ref else "n/a")]
    if main:
      cells += _costs(cost_of.get((r["method"], r["seed"]), {}))
    out.append(fmt.row(cells))
  for z in numbers["zero_shot"]:
    cells = [z["variant"], "", _with_ci(z["mean_auroc"],
                                        z.get("mean_auroc_ci")), ""]
    out.append(fmt.row(cells + (["0", "", "", ""] if main else [])))
  if len(result["seeds"]) > 1:
    out += _over_seeds(numbers, ref)
  return out + _labels(numbers, len(result["seeds"]))


def _over_seeds(numbers: dict, ref: str) -> list[str]:
  out = ["", "Over the seeds (mean ± SD):", ""]
  out += fmt.head(["Method", "Mean AUROC", f"Δ vs {ref}"])
  for s in numbers["over_seeds"]:
    out.append(fmt.row([
        s["method"], fmt.pm(s["mean_auroc"]),
        fmt.pm(s["difference"], True) if s["difference"]["n"] else ""]))
  return out


def _labels(numbers: dict, num_seeds: int) -> list[str]:
  labels = numbers["label_names"]
  over = " (mean ± SD over seeds)" if num_seeds > 1 else ""
  out = ["", f"Per-label AUROC{over}:", ""]
  out += fmt.head(["Method"] + labels)
  for s in numbers["over_seeds"]:
    out.append(fmt.row([s["method"]]
                         + [fmt.pm(s["auroc"][n]) for n in labels]))
  for z in numbers["zero_shot"]:
    out.append(fmt.row([z["variant"]]
                         + [fmt.num(z["auroc"].get(n)) for n in labels]))
  return out


def _with_ci(value: Optional[float], ci) -> str:
  """"0.812 [0.790, 0.835]", or the value alone without an interval."""
  if not ci or any(v is None for v in ci):
    return fmt.num(value)
  return (f"{fmt.num(value)} [{fmt.num(ci[0])}, "
          f"{fmt.num(ci[1])}]")


def _costs(x: dict) -> list[str]:
  """Trainable, frozen, images/s and peak memory cells of a run."""
  def count(n):
    return "n/a" if n is None else f"{int(n):,}"
  speed = x.get("train_images_per_s")
  return [count(x.get("trainable_params")), count(x.get("frozen_params")),
          "n/a" if speed is None else f"{speed:.1f}",
          memory(x.get("peak_memory_bytes"), x.get("peak_memory_kind"))]


def memory(num_bytes: Optional[int], kind: Optional[str]) -> str:
  """"1.25 GiB (device)", "310 MiB (host RSS)"; "n/a" when unknown."""
  if num_bytes is None:
    return "n/a"
  size = (f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30
          else f"{num_bytes / 2**20:.0f} MiB")
  return f"{size} ({MEMORY_KINDS.get(kind, kind or 'unknown kind')})"

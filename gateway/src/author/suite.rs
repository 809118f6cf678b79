//! `gateway plugin test`: the conformance suite any plugin must pass to be
//! served well, whatever language it was written in.
//!
//! - it loads: compiles, implements the world, `info()` answers quickly
//!   with usable metadata;
//! - `infer` on inputs generated from the declared shapes and datatypes:
//!   a batch of one, a batch of many, an empty batch (where the first
//!   dimension is free), zeros, and each datatype's extreme values. Each
//!   call must answer outputs that match the declaration, or refuse the
//!   input with `invalid-input` and a readable message; a trap, a panic,
//!   an `internal` error or a malformed output fails;
//! - the same input twice gives the same output, byte for byte (what the
//!   gateway's replay and shadow comparison rely on);
//! - its slowest call stays under half its deadline, and no call passes
//!   its memory cap (the limits given, by default the policy defaults);
//! - and the same for every request of an `--inputs` file.

use std::fmt::Write as _;
use std::time::Duration;

use super::{Loaded, Settings};
use crate::contract::PluginError;
use crate::tensor::{Datatype, Fill, Tensor, TensorSpec, generated};

/// What the suite found: one line per check, and whether all passed.
#[derive(Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub failures: usize,
}

impl Report {
    fn pass(&mut self, check: &str, detail: impl AsRef<str>) {
        self.lines
            .push(format!("ok    {check}: {}", detail.as_ref()));
    }

    fn fail(&mut self, check: &str, detail: impl AsRef<str>) {
        self.failures += 1;
        self.lines
            .push(format!("FAIL  {check}: {}", detail.as_ref()));
    }
}

/// How long `info()` may take before the suite calls the plugin slow to
/// start (the gateway's own limit is 5 s).
const INFO_BUDGET: Duration = Duration::from_secs(1);

/// The size of the "batch of many" case.
const MANY: i64 = 64;

/// Calls timed for the time and memory report.
const TIMED_CALLS: usize = 20;

/// Runs the suite on a loaded plugin; `requests` are the decoded inputs
/// of an `--inputs` file, each with its label.
pub async fn conformance(
    loaded: &Loaded,
    settings: &Settings,
    requests: &[(String, Vec<Tensor>)],
) -> Report {
    let mut report = Report::default();
    let plugin = &loaded.plugin;
    let info = plugin.info();
    report.pass(
        "loads",
        format!(
            "compiled and info() in {:.0} ms; reports itself as `{}` {} ({:?}); inputs {}; outputs {}",
            loaded.load_time.as_secs_f64() * 1e3,
            info.name,
            info.version,
            info.description,
            specs(&info.inputs),
            specs(&info.outputs)
        ),
    );
    match plugin
        .imports()
        .iter()
        .filter(|i| !i.starts_with("gateway:"))
        .count()
    {
        0 => report.pass("imports", "none"),
        _ => report.pass("imports", plugin.imports().join(", ")),
    }
    let started = std::time::Instant::now();
    match plugin
        .starts_under(settings.memory_bytes, settings.grants)
        .await
    {
        Ok(()) if started.elapsed() <= INFO_BUDGET => report.pass(
            "info() under the limits",
            format!(
                "{:.2} ms in a fresh sandbox",
                started.elapsed().as_secs_f64() * 1e3
            ),
        ),
        Ok(()) => report.fail(
            "info() under the limits",
            format!(
                "took {:.0} ms; keep start-up under {} ms",
                started.elapsed().as_secs_f64() * 1e3,
                INFO_BUDGET.as_millis()
            ),
        ),
        Err(e) => report.fail("info() under the limits", format!("it {e}")),
    }

    let free_first = info.inputs.iter().all(|s| s.shape.first() == Some(&-1));
    let mut wanted = vec![
        ("a batch of 1".to_string(), 1, Fill::Varied),
        (format!("a batch of {MANY}"), MANY, Fill::Varied),
        ("zeros".into(), 1, Fill::Zero),
        ("smallest values".into(), 2, Fill::Min),
        ("largest values".into(), 2, Fill::Max),
    ];
    if free_first {
        wanted.push(("an empty batch".into(), 0, Fill::Varied));
    }
    let mut cases: Vec<(String, Vec<Tensor>)> = Vec::new();
    for (label, batch, fill) in wanted {
        match generated(&info.inputs, batch, fill, settings.memory_bytes) {
            Some(inputs) => cases.push((label, inputs)),
            None => report.pass(
                &format!("infer on {label}"),
                "skipped: the declared shapes make inputs larger than the memory cap",
            ),
        }
    }
    for (label, inputs) in requests {
        match crate::validate::check_inputs(inputs, info) {
            Ok(()) => cases.push((label.clone(), inputs.clone())),
            Err(e) => report.fail(
                &format!("infer on {label}"),
                format!("the gateway would refuse it (400): {e}"),
            ),
        }
    }

    let mut stats = Vec::new();
    for (label, inputs) in &cases {
        let (result, used) = loaded.call(inputs, settings).await;
        stats.push(used);
        let check = format!("infer on {label}");
        match result {
            Ok(outputs) => match crate::validate::check_outputs(&outputs, info, false) {
                Ok(()) => {
                    report.pass(&check, shapes(&outputs));
                    let (again, _) = loaded.call(inputs, settings).await;
                    match again {
                        Ok(second) if same(&second, &outputs) => {
                            report.pass(&format!("deterministic on {label}"), "same output twice")
                        }
                        Ok(_) => report.fail(
                            &format!("deterministic on {label}"),
                            "the same input gave another output the second time: does it keep state, or read real random numbers or clocks?",
                        ),
                        Err(e) => report.fail(
                            &format!("deterministic on {label}"),
                            format!("the second call failed: it {e}"),
                        ),
                    }
                }
                Err(e) => report.fail(&check, format!("outputs break its info(): {e}")),
            },
            Err(PluginError::Rejected(message)) if message.trim().is_empty() => report.fail(
                &check,
                "refused the input with an empty message: say what is wrong",
            ),
            Err(PluginError::Rejected(message)) => report.pass(
                &check,
                format!("refused as invalid input (a 400): {message}"),
            ),
            Err(e) => report.fail(&check, format!("it {e}")),
        }
    }

    // Time and memory, over repeated calls of the first cases.
    let mut times = Vec::new();
    for _ in 0..TIMED_CALLS {
        for (_, inputs) in cases.iter().take(2) {
            let (_, used) = loaded.call(inputs, settings).await;
            times.push(used.ran);
            stats.push(used);
        }
    }
    times.sort_unstable();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    let slowest = times.last().copied().unwrap_or_default();
    let memory = stats.iter().map(|s| s.memory_bytes).max().unwrap_or(0);
    let mut detail = String::new();
    let _ = write!(
        detail,
        "median {:.3} ms, slowest {:.3} ms (deadline {} ms); linear memory up to {:.1} MiB (cap {} MiB)",
        median.as_secs_f64() * 1e3,
        slowest.as_secs_f64() * 1e3,
        settings.timeout.as_millis(),
        memory as f64 / f64::from(1 << 20),
        settings.memory_bytes >> 20
    );
    if slowest * 2 > settings.timeout {
        report.fail(
            "time and memory",
            format!("{detail}: the slowest call is over half its deadline"),
        );
    } else {
        report.pass("time and memory", detail);
    }
    report
}

/// The same tensors, byte for byte.
fn same(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name && x.datatype == y.datatype && x.shape == y.shape && x.data == y.data
        })
}

/// "`x` FP32 [-1, 6], ..." for declarations or tensors alike.
fn list<'a>(items: impl Iterator<Item = (&'a str, Datatype, &'a [i64])>) -> String {
    items
        .map(|(name, datatype, shape)| format!("`{name}` {} {shape:?}", datatype.as_v2()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn specs(specs: &[TensorSpec]) -> String {
    list(
        specs
            .iter()
            .map(|s| (s.name.as_str(), s.datatype, s.shape.as_slice())),
    )
}

fn shapes(outputs: &[Tensor]) -> String {
    list(
        outputs
            .iter()
            .map(|t| (t.name.as_str(), t.datatype, t.shape.as_slice())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::values;

    #[test]
    fn generated_inputs_follow_the_declaration() {
        let specs = [
            TensorSpec {
                name: "x".into(),
                datatype: Datatype::Fp32,
                shape: vec![-1, 6],
            },
            TensorSpec {
                name: "s".into(),
                datatype: Datatype::Bytes,
                shape: vec![-1],
            },
        ];
        let inputs = generated(&specs, 3, Fill::Varied, 1 << 20).unwrap();
        assert_eq!(inputs[0].shape, vec![3, 6]);
        assert_eq!(inputs[0].data.len(), 18 * 4);
        assert_eq!(crate::tensor::check_layout(&inputs[1]).unwrap(), 3);
        let empty = generated(&specs, 0, Fill::Max, 1 << 20).unwrap();
        assert!(empty.iter().all(|t| t.data.is_empty() && t.shape[0] == 0));
        let max = generated(&specs[..1], 1, Fill::Max, 1 << 20).unwrap();
        // Shapes whose product overflows, or past the cap, are not made.
        let huge = [TensorSpec {
            name: "x".into(),
            datatype: Datatype::Fp32,
            shape: vec![-1, i64::MAX, 4],
        }];
        assert!(generated(&huge, 64, Fill::Varied, 1 << 30).is_none());
        assert!(generated(&specs[..1], 1 << 20, Fill::Varied, 1 << 20).is_none());
        assert_eq!(crate::tensor::numbers(&max[0])[0], 1e30_f32 as f64);
        let ints = values(Datatype::Int8, 2, Fill::Min);
        assert_eq!(ints, vec![0x80, 0x80]);
    }
}

//! Scenarios: TOML files of weighted flows of named steps, compiled into a [`Plan`]
//! whose requests are pre-built where nothing varies and templated where something does.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::Deserialize;

use crate::template::{Escape, Template, VarTable};

/// Built-in scenarios, by name.
pub const BUILT_IN: &[(&str, &str)] = &[
    ("healthz", include_str!("../scenarios/healthz.toml")),
    ("flash-sale", include_str!("../scenarios/flash-sale.toml")),
    ("browse", include_str!("../scenarios/browse.toml")),
    ("mixed-day", include_str!("../scenarios/mixed-day.toml")),
];

/// Variables every scenario may use.
pub const BUILT_IN_VARS: &[&str] = &[
    "run",
    "user",
    "token",
    "iteration",
    "admin_token",
    "sale_id",
    "sku",
];

/// The most generated shoppers a scenario may ask for (each gets a pre-minted token).
pub const MAX_USERS: usize = 1_000_000;

// ---- the file format -------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub load: LoadSection,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    #[serde(default)]
    pub setup: SetupSection,
    #[serde(default)]
    pub thresholds: Thresholds,
    pub flows: Vec<FlowFile>,
}

/// Defaults for the load model; command-line flags override them.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSection {
    /// Arrivals (flow iterations) per second, open model.
    pub rate: Option<f64>,
    /// Virtual users, closed model.
    pub vus: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub ramp: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub duration: Option<Duration>,
    /// Arrival-rate stages (open model): each ramps linearly to `target` over `duration`.
    #[serde(default)]
    pub stages: Vec<StageFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageFile {
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    pub target: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Generated shopper ids `<prefix>-<run>-<n>`, n in 0..users.
    pub users: Option<usize>,
    pub user_prefix: Option<String>,
    /// CSV file (with a header row); its columns become variables, row `iteration % rows`.
    /// A `user` column replaces the generated ids; a `token` column the minted tokens.
    pub csv: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupSection {
    pub sale: Option<SaleSetup>,
}

/// A product and a live flash sale created through the admin API before the run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaleSetup {
    pub quantity: u64,
    #[serde(default = "default_per_user_limit")]
    pub per_user_limit: u32,
    #[serde(default = "default_price")]
    pub price_cents: u64,
    /// Product stock; defaults to the sale quantity.
    pub stock: Option<u64>,
}

fn default_per_user_limit() -> u32 {
    1
}
fn default_price() -> u64 {
    5_900
}

/// Pass/fail limits; the run exits non-zero when one is missed.
#[derive(Debug, Default, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub p99: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub p999: Option<Duration>,
    /// Share of requests (0..=1) that may end in an unexpected status or a transport error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowFile {
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    pub steps: Vec<StepFile>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepFile {
    pub name: String,
    #[serde(default = "default_method")]
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `shopper` adds `Authorization: Bearer {{token}}`, `admin` the admin token.
    #[serde(default)]
    pub auth: Auth,
    /// A JSON body written as TOML; string values are templates.
    pub body: Option<toml::Value>,
    /// A JSON body as raw text with templates, for values that must not be quoted.
    pub body_raw: Option<String>,
    /// Statuses that count as success; default any 2xx.
    #[serde(default)]
    pub expect: Vec<u16>,
    /// Variables taken from the JSON answer by JSON pointer, e.g. `order_id = "/order_id"`.
    #[serde(default)]
    pub extract: BTreeMap<String, String>,
    /// Pause before this step (user think time).
    pub think: Option<Think>,
    /// Marks the step for the books check.
    pub book: Option<BookKind>,
}

fn default_method() -> String {
    "GET".into()
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Auth {
    #[default]
    None,
    Shopper,
    Admin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BookKind {
    Purchase,
    Pay,
}

/// Think-time distributions.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "dist", rename_all = "snake_case", deny_unknown_fields)]
pub enum Think {
    Constant {
        #[serde(with = "humantime_serde")]
        value: Duration,
    },
    Uniform {
        #[serde(with = "humantime_serde")]
        min: Duration,
        #[serde(with = "humantime_serde")]
        max: Duration,
    },
    Exponential {
        #[serde(with = "humantime_serde")]
        mean: Duration,
    },
}

impl Think {
    /// Draws one pause from `u`, a uniform number in [0, 1).
    pub fn sample(&self, u: f64) -> Duration {
        match *self {
            Think::Constant { value } => value,
            Think::Uniform { min, max } => min + (max - min).mul_f64(u),
            // Capped at 10× the mean so one draw cannot stall a session for ever.
            Think::Exponential { mean } => mean.mul_f64((-(1.0 - u).ln()).min(10.0)),
        }
    }
}

// ---- the compiled plan -----------------------------------------------------------------

#[derive(Debug)]
pub struct Plan {
    pub name: String,
    pub description: String,
    pub vars: VarTable,
    pub flows: Vec<FlowPlan>,
    /// Cumulative flow weights, for picking a flow per session.
    pub cumulative_weights: Vec<u64>,
    /// Every step of every flow, in order; `StepPlan::id` indexes it.
    pub step_names: Vec<String>,
    pub load: LoadSection,
    pub users: usize,
    pub user_prefix: String,
    pub csv: Option<CsvData>,
    pub constants: Vec<(usize, Arc<str>)>,
    pub setup: Option<SaleSetup>,
    pub thresholds: Thresholds,
}

#[derive(Debug)]
pub struct FlowPlan {
    pub name: String,
    pub steps: Vec<StepPlan>,
}

#[derive(Debug)]
pub struct StepPlan {
    pub id: usize,
    pub name: String,
    pub method: hyper::Method,
    pub path: Template,
    pub headers: Vec<(hyper::header::HeaderName, Template)>,
    pub auth: Auth,
    pub body: Option<Template>,
    pub expect: Vec<u16>,
    pub extract: Vec<(usize, String)>,
    pub think: Option<Think>,
    pub book: Option<BookKind>,
}

impl StepPlan {
    pub fn expected(&self, status: u16) -> bool {
        if self.expect.is_empty() {
            (200..300).contains(&status)
        } else {
            self.expect.contains(&status)
        }
    }
}

#[derive(Debug)]
pub struct CsvData {
    /// Slot of each column.
    pub columns: Vec<usize>,
    pub rows: Vec<Vec<Arc<str>>>,
}

impl Plan {
    /// Loads a built-in scenario by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> anyhow::Result<Plan> {
        if let Some((_, text)) = BUILT_IN.iter().find(|(name, _)| *name == name_or_path) {
            return Plan::parse(text, None);
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            let names: Vec<_> = BUILT_IN.iter().map(|(n, _)| *n).collect();
            bail!(
                "no scenario `{name_or_path}`: neither a built-in ({}) nor a file",
                names.join(", ")
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read scenario {}", path.display()))?;
        Plan::parse(&text, path.parent()).with_context(|| format!("scenario {}", path.display()))
    }

    /// Parses and checks a scenario. `base` resolves a relative CSV path.
    pub fn parse(text: &str, base: Option<&Path>) -> anyhow::Result<Plan> {
        let file: ScenarioFile = toml::from_str(text).context("invalid scenario TOML")?;
        compile(file, base)
    }

    pub fn flow_for(&self, pick: u64) -> &FlowPlan {
        let total = *self.cumulative_weights.last().expect("at least one flow");
        let x = pick % total;
        let i = self.cumulative_weights.partition_point(|&c| c <= x);
        &self.flows[i]
    }

    pub fn has_books(&self) -> bool {
        self.flows
            .iter()
            .flat_map(|f| &f.steps)
            .any(|s| s.book == Some(BookKind::Purchase))
    }
}

fn compile(file: ScenarioFile, base: Option<&Path>) -> anyhow::Result<Plan> {
    ensure!(!file.flows.is_empty(), "a scenario needs at least one flow");
    let mut vars = VarTable::default();
    for name in BUILT_IN_VARS {
        vars.slot(name);
    }
    let mut constants = Vec::new();
    for (name, value) in &file.vars {
        check_var_name(name)?;
        constants.push((vars.slot(name), Arc::from(value.as_str())));
    }

    let csv = match &file.data.csv {
        None => None,
        Some(path) => {
            let path = match base {
                Some(base) if path.is_relative() => base.join(path),
                _ => path.clone(),
            };
            Some(read_csv(&path, &mut vars)?)
        }
    };
    let users = file.data.users.unwrap_or(1_000);
    ensure!(
        (1..=MAX_USERS).contains(&users),
        "data.users must be within 1..={MAX_USERS}"
    );

    // Every extracted name gets a slot up front; whether a step may use it is checked per
    // flow below (only after the step that extracts it).
    for flow in &file.flows {
        for step in &flow.steps {
            for name in step.extract.keys() {
                check_var_name(name)?;
                vars.slot(name);
            }
        }
    }
    let base_known: HashSet<usize> = (0..vars.len())
        .filter(|&slot| {
            let name = vars.name(slot);
            !file
                .flows
                .iter()
                .any(|f| f.steps.iter().any(|s| s.extract.contains_key(name)))
                || BUILT_IN_VARS.contains(&name)
        })
        .collect();

    let mut flows = Vec::new();
    let mut cumulative_weights = Vec::new();
    let mut total_weight = 0u64;
    let mut step_names = Vec::new();
    let mut flow_names = HashSet::new();
    for flow in file.flows {
        ensure!(
            flow_names.insert(flow.name.clone()),
            "flow `{}` is defined twice",
            flow.name
        );
        ensure!(
            flow.weight > 0,
            "flow `{}`: weight must be at least 1",
            flow.name
        );
        ensure!(!flow.steps.is_empty(), "flow `{}` has no steps", flow.name);
        let mut known = base_known.clone();
        let mut steps = Vec::new();
        for step in flow.steps {
            let context = format!("flow `{}`, step `{}`", flow.name, step.name);
            let id = step_names.len();
            step_names.push(format!("{}/{}", flow.name, step.name));
            let compiled = compile_step(id, step, &vars, &known).context(context)?;
            for (slot, _) in &compiled.extract {
                known.insert(*slot);
            }
            steps.push(compiled);
        }
        total_weight += u64::from(flow.weight);
        cumulative_weights.push(total_weight);
        flows.push(FlowPlan {
            name: flow.name,
            steps,
        });
    }

    if let Some(rate) = file.load.rate {
        ensure!(
            rate > 0.0 && rate <= crate::RATE_MAX,
            "load.rate must be positive and at most {}/s",
            crate::RATE_MAX
        );
    }
    if let Some(vus) = file.load.vus {
        ensure!(vus > 0, "load.vus must be positive");
    }
    // One model per scenario, as on the command line: which of two wins is not for the
    // tool to guess.
    let models = [
        file.load.rate.is_some(),
        file.load.vus.is_some(),
        !file.load.stages.is_empty(),
    ];
    ensure!(
        models.iter().filter(|given| **given).count() <= 1,
        "load: give one of rate, vus or stages, not several"
    );
    if let Some(setup) = &file.setup.sale {
        ensure!(setup.quantity > 0, "setup.sale.quantity must be positive");
        ensure!(
            setup.stock.unwrap_or(setup.quantity) >= setup.quantity,
            "setup.sale.stock must be at least the quantity"
        );
    }
    if let Some(rate) = file.thresholds.max_error_rate {
        ensure!(
            (0.0..=1.0).contains(&rate),
            "thresholds.max_error_rate must be within 0..=1"
        );
    }

    Ok(Plan {
        name: file.name,
        description: file.description,
        vars,
        flows,
        cumulative_weights,
        step_names,
        load: file.load,
        users,
        user_prefix: file.data.user_prefix.unwrap_or_else(|| "press".into()),
        csv,
        constants,
        setup: file.setup.sale,
        thresholds: file.thresholds,
    })
}

fn check_var_name(name: &str) -> anyhow::Result<()> {
    ensure!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
        "variable name `{name}` must be letters, digits, `_` or `-`"
    );
    Ok(())
}

fn compile_step(
    id: usize,
    step: StepFile,
    vars: &VarTable,
    known: &HashSet<usize>,
) -> anyhow::Result<StepPlan> {
    let method: hyper::Method = step
        .method
        .to_ascii_uppercase()
        .parse()
        .with_context(|| format!("bad method `{}`", step.method))?;
    ensure!(
        step.path.starts_with('/'),
        "path `{}` must start with `/`",
        step.path
    );
    let check = |t: Template| -> anyhow::Result<Template> {
        for slot in t.slots() {
            ensure!(
                known.contains(&slot),
                "`{}` is used before a step extracts it",
                vars.name(slot)
            );
        }
        Ok(t)
    };
    let path = check(Template::compile(&step.path, vars, Escape::None)?)?;
    // What the file spells itself must make a request: a space in a path or a line break
    // in a header would fail every session at run time (values put in from variables
    // are checked as each request is built).
    ensure!(
        format!("http://host{}", path.literal_shape())
            .parse::<hyper::Uri>()
            .is_ok(),
        "path `{}` is not a valid request path (spaces and other characters must be percent-encoded)",
        step.path
    );
    let mut headers = Vec::new();
    for (name, value) in &step.headers {
        let header: hyper::header::HeaderName = name
            .parse()
            .with_context(|| format!("bad header name `{name}`"))?;
        let template = check(Template::compile(value, vars, Escape::None)?)?;
        ensure!(
            hyper::header::HeaderValue::from_str(&template.literal_shape()).is_ok(),
            "header `{name}`: `{value}` is not a valid header value (no line breaks or other control characters)"
        );
        headers.push((header, template));
    }
    let body_text = match (step.body, step.body_raw) {
        (Some(_), Some(_)) => bail!("give `body` or `body_raw`, not both"),
        (Some(value), None) => Some(serde_json::to_string(&value)?),
        (None, raw) => raw,
    };
    let body = match body_text {
        Some(text) => Some(check(Template::compile(&text, vars, Escape::Json)?)?),
        None => None,
    };
    for status in &step.expect {
        ensure!(
            (100..600).contains(status),
            "expected status {status} is not an HTTP status"
        );
    }
    let mut extract = Vec::new();
    for (name, pointer) in step.extract {
        ensure!(
            pointer.is_empty() || pointer.starts_with('/'),
            "extract `{name}`: `{pointer}` is not a JSON pointer (they start with `/`)"
        );
        extract.push((vars.get(&name).expect("registered above"), pointer));
    }
    if let Some(Think::Uniform { min, max }) = &step.think {
        ensure!(min <= max, "think: min must not exceed max");
    }
    Ok(StepPlan {
        id,
        name: step.name,
        method,
        path,
        headers,
        auth: step.auth,
        body,
        expect: step.expect,
        extract,
        think: step.think,
        book: step.book,
    })
}

fn read_csv(path: &Path, vars: &mut VarTable) -> anyhow::Result<CsvData> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("open CSV {}", path.display()))?;
    let mut columns = Vec::new();
    for name in reader.headers()?.iter() {
        check_var_name(name).with_context(|| format!("CSV {}", path.display()))?;
        columns.push(vars.slot(name));
    }
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.with_context(|| format!("CSV {}", path.display()))?;
        rows.push(record.iter().map(Arc::from).collect());
        ensure!(
            rows.len() <= MAX_USERS,
            "CSV {} has more than {MAX_USERS} rows",
            path.display()
        );
    }
    ensure!(!rows.is_empty(), "CSV {} has no rows", path.display());
    Ok(CsvData { columns, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_scenario_compiles() {
        for (name, _) in BUILT_IN {
            let plan = Plan::load(name).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert_eq!(plan.name, *name);
        }
        assert!(Plan::load("flash-sale").unwrap().has_books());
    }

    #[test]
    fn flows_are_picked_by_weight() {
        let plan = Plan::parse(
            r#"
name = "w"
[[flows]]
name = "a"
weight = 3
steps = [{ name = "x", path = "/a" }]
[[flows]]
name = "b"
weight = 1
steps = [{ name = "y", path = "/b" }]
"#,
            None,
        )
        .unwrap();
        let picks: Vec<_> = (0..8).map(|n| plan.flow_for(n).name.as_str()).collect();
        assert_eq!(picks, ["a", "a", "a", "b", "a", "a", "a", "b"]);
    }

    #[test]
    fn a_variable_used_before_it_is_extracted_is_refused() {
        let err = Plan::parse(
            r#"
name = "bad"
[[flows]]
name = "f"
steps = [
  { name = "pay", path = "/v1/orders/{{order_id}}/pay", method = "POST" },
  { name = "buy", path = "/buy", method = "POST", extract = { order_id = "/order_id" } },
]
"#,
            None,
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("`order_id` is used before a step extracts it"),
            "{err:#}"
        );
    }

    #[test]
    fn bad_scenarios_say_what_is_wrong() {
        let cases = [
            ("name = 'x'\nflows = []", "at least one flow"),
            (
                "name = 'x'\n[[flows]]\nname='f'\nsteps=[{name='s', path='nope'}]",
                "must start with `/`",
            ),
            (
                "name = 'x'\n[[flows]]\nname='f'\nsteps=[{name='s', path='/{{who}}'}]",
                "unknown variable `who`",
            ),
            (
                "name = 'x'\n[[flows]]\nname='f'\nsteps=[{name='s', path='/', bogus=1}]",
                "unknown field `bogus`",
            ),
            (
                "name = 'x'\n[[flows]]\nname='f'\nweight=0\nsteps=[{name='s', path='/'}]",
                "weight must be at least 1",
            ),
            (
                "name = 'x'\n[[flows]]\nname='f'\nsteps=[{name='s', path='/', expect=[999]}]",
                "not an HTTP status",
            ),
            (
                "name = 'x'\n[[flows]]\nname='f'\nsteps=[{name='s', path='/', extract={a='order_id'}}]",
                "not a JSON pointer",
            ),
            (
                "name = 'x'\n[data]\nusers = 0\n[[flows]]\nname='f'\nsteps=[{name='s', path='/'}]",
                "data.users",
            ),
            (
                "name = 'x'\n[[flows]]\nname='f'\nsteps=[{name='s', path='/a b/{{run}}'}]",
                "not a valid request path",
            ),
            (
                "name = 'x'\n[[flows]]\nname='f'\nsteps=[{name='s', path='/', headers={X-A=\"a\\nb\"}}]",
                "not a valid header value",
            ),
            (
                "name = 'x'\n[load]\nrate = 10\nvus = 2\n[[flows]]\nname='f'\nsteps=[{name='s', path='/'}]",
                "not several",
            ),
            (
                "name = 'x'\n[load]\nrate = 1e300\n[[flows]]\nname='f'\nsteps=[{name='s', path='/'}]",
                "load.rate",
            ),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", Plan::parse(text, None).unwrap_err());
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn csv_columns_become_variables() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("users.csv"),
            "user,city\nann,Hangzhou\nbob,Shanghai\n",
        )
        .unwrap();
        let plan = Plan::parse(
            r#"
name = "c"
[data]
csv = "users.csv"
[[flows]]
name = "f"
steps = [{ name = "s", path = "/stores/{{city}}/{{user}}" }]
"#,
            Some(dir.path()),
        )
        .unwrap();
        let csv = plan.csv.as_ref().unwrap();
        assert_eq!(csv.rows.len(), 2);
        assert_eq!(plan.vars.name(csv.columns[1]), "city");
        assert_eq!(csv.columns[0], plan.vars.get("user").unwrap());
    }

    #[test]
    fn think_times_follow_their_distribution() {
        let uniform = Think::Uniform {
            min: Duration::from_millis(10),
            max: Duration::from_millis(30),
        };
        assert_eq!(uniform.sample(0.5), Duration::from_millis(20));
        let exp = Think::Exponential {
            mean: Duration::from_millis(100),
        };
        let n = 10_000;
        let mean: f64 = (0..n)
            .map(|i| exp.sample((i as f64 + 0.5) / n as f64).as_secs_f64())
            .sum::<f64>()
            / n as f64;
        assert!((mean - 0.1).abs() < 0.005, "{mean}");
    }
}

//! The gateway's own evaluator for the ONNX-ML tree ensembles
//! (`TreeEnsembleClassifier`, `TreeEnsembleRegressor`): what scikit-learn's
//! decision trees, random forests and gradient boosting export to.
//!
//! tract-onnx 0.23 has no regressor, refuses binary gradient boosting and
//! runs forests ~20x slower than onnxruntime (a 10-tree forest: 118 µs
//! against 6 µs), so
//! both operators are registered here in place of tract's. At load time the
//! node attributes become one flat array of 16-byte nodes per ensemble (all
//! trees back to back, children as absolute indices, leaves pointing into
//! one array of weights), checked once: every index in bounds, every tree
//! acyclic, every feature known. A row then walks each tree with one compare
//! and one load per level and no allocation.
//!
//! Scores follow onnxruntime's semantics, including its binary-classifier
//! rules (one scored class, base values, `[1 - p, p]` or `[-s, s]` layouts),
//! which is what the conformance suite checks against.

use std::fmt;
use std::sync::Arc;

use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

/// A node's feature index when the node is a leaf.
const LEAF: u32 = u32::MAX;

/// Rows that walk a tree together.
const LANES: usize = 8;

/// Branch comparisons of the ONNX-ML spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
}

impl Mode {
    fn parse(s: &str) -> Result<Option<Mode>, String> {
        Ok(Some(match s {
            "BRANCH_LEQ" => Mode::Leq,
            "BRANCH_LT" => Mode::Lt,
            "BRANCH_GTE" => Mode::Gte,
            "BRANCH_GT" => Mode::Gt,
            "BRANCH_EQ" => Mode::Eq,
            "BRANCH_NEQ" => Mode::Neq,
            "LEAF" => return Ok(None),
            other => return Err(format!("unknown node mode `{other}`")),
        }))
    }

    #[inline(always)]
    fn goes_true(self, x: f32, threshold: f32) -> bool {
        match self {
            Mode::Leq => x <= threshold,
            Mode::Lt => x < threshold,
            Mode::Gte => x >= threshold,
            Mode::Gt => x > threshold,
            Mode::Eq => x == threshold,
            Mode::Neq => x != threshold,
        }
    }
}

/// One node: the feature compared, its threshold and the two children. A
/// leaf compares feature 0 with NaN and has itself as both children, so a
/// walk that goes on past a leaf stays on it (see [`Ensemble::walk_lanes`]).
#[derive(Clone, Copy, Debug)]
struct Node {
    feature: u32,
    threshold: f32,
    true_child: u32,
    false_child: u32,
}

/// How leaf values of different trees combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

/// What is applied to the aggregated scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PostTransform {
    None,
    Logistic,
    Softmax,
    SoftmaxZero,
}

impl PostTransform {
    /// The node's `post_transform`; PROBIT is refused.
    pub(super) fn parse(node: &NodeProto) -> Result<PostTransform, String> {
        match node
            .get_attr_opt::<&str>("post_transform")
            .map_err(|e| format!("{e:#}"))?
        {
            None | Some("NONE") => Ok(PostTransform::None),
            Some("LOGISTIC") => Ok(PostTransform::Logistic),
            Some("SOFTMAX") => Ok(PostTransform::Softmax),
            Some("SOFTMAX_ZERO") => Ok(PostTransform::SoftmaxZero),
            Some(other) => Err(format!("post_transform `{other}` is not supported")),
        }
    }
}

/// The classifier's labels, as the model declares them.
#[derive(Clone, Debug)]
pub(super) enum Labels {
    Int(Vec<i64>),
    Str(Vec<String>),
}

impl Labels {
    /// The labels of a classifier node: `ints_attr` (whose name differs
    /// between operators) or `classlabels_strings`.
    pub(super) fn parse(node: &NodeProto, ints_attr: &str) -> Result<Labels, String> {
        let e = |err: TractError| format!("{err:#}");
        let ints = attr_ints(node, ints_attr).map_err(e)?;
        let strings: Vec<String> = node
            .get_attr_opt_tvec::<&str>("classlabels_strings")
            .map_err(e)?
            .unwrap_or_default()
            .iter()
            .map(|s| s.to_string())
            .collect();
        match (ints.is_empty(), strings.is_empty()) {
            (false, true) => Ok(Labels::Int(ints)),
            (true, false) => Ok(Labels::Str(strings)),
            _ => Err(format!(
                "needs exactly one of `{ints_attr}` and `classlabels_strings`"
            )),
        }
    }

    /// A tensor of the labels at `indices`.
    pub(super) fn pick(&self, indices: &[usize]) -> Tensor {
        match self {
            Labels::Int(l) => {
                let v: Vec<i64> = indices.iter().map(|&i| l[i]).collect();
                tensor1(&v)
            }
            Labels::Str(l) => {
                let v: Vec<String> = indices.iter().map(|&i| l[i].clone()).collect();
                tensor1(&v)
            }
        }
    }

    pub(super) fn datum_type(&self) -> DatumType {
        match self {
            Labels::Int(_) => DatumType::I64,
            Labels::Str(_) => DatumType::String,
        }
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Labels::Int(l) => l.len(),
            Labels::Str(l) => l.len(),
        }
    }
}

/// A parsed, checked tree ensemble.
pub struct Ensemble {
    nodes: Vec<Node>,
    /// Per node: its range in `weights` (empty for a branch).
    leaf_weights: Vec<(u32, u32)>,
    /// Per node, when every leaf has exactly one weight (regressors,
    /// gradient boosting): that weight, read without the range.
    single: Option<Vec<(u32, f32)>>,
    /// Per tree: branches on its longest path.
    depths: Vec<u32>,
    /// Per node, when the modes are not all `BRANCH_LEQ`.
    modes: Option<Vec<Mode>>,
    /// Per node, when any node sends NaN to its true child.
    missing_true: Option<Vec<bool>>,
    roots: Vec<u32>,
    /// (target or class index, weight), grouped by leaf.
    weights: Vec<(u32, f32)>,
    n_targets: usize,
    /// Columns a row must have: the largest feature index used, plus one.
    n_features: usize,
    aggregate: Aggregate,
    post_transform: PostTransform,
    base_values: Vec<f32>,
    /// `Some` for a classifier.
    classifier: Option<ClassifierLayout>,
}

#[derive(Clone, Debug)]
struct ClassifierLayout {
    labels: Labels,
    /// Two labels and leaves that score a single class: onnxruntime's
    /// "binary case", which derives the second class's score.
    binary_one_class: bool,
    weights_all_positive: bool,
}

impl fmt::Debug for Ensemble {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Ensemble({} trees, {} nodes, {} targets, {:?}, {:?})",
            self.roots.len(),
            self.nodes.len(),
            self.n_targets,
            self.aggregate,
            self.post_transform
        )
    }
}

fn attr_ints(node: &NodeProto, name: &str) -> TractResult<Vec<i64>> {
    Ok(node.get_attr_opt_vec::<i64>(name)?.unwrap_or_default())
}

fn attr_floats(node: &NodeProto, name: &str) -> TractResult<Vec<f32>> {
    Ok(node.get_attr_opt_vec::<f32>(name)?.unwrap_or_default())
}

fn index(value: i64, what: &str) -> Result<u32, String> {
    u32::try_from(value).map_err(|_| format!("{what} {value} is out of range"))
}

impl Ensemble {
    /// Parses and checks the attributes of a `TreeEnsembleClassifier`
    /// (`classifier == true`) or `TreeEnsembleRegressor` node.
    pub fn parse(node: &NodeProto, classifier: bool) -> TractResult<Ensemble> {
        Self::parse_inner(node, classifier)
            .map_err(|e| format_err!("{} `{}`: {e}", node.op_type, node.name))
    }

    fn parse_inner(node: &NodeProto, classifier: bool) -> Result<Ensemble, String> {
        let e = |err: TractError| format!("{err:#}");
        for attr in &node.attribute {
            if attr.name.ends_with("_as_tensor") {
                return Err(format!(
                    "attribute `{}` (double-precision trees) is not supported",
                    attr.name
                ));
            }
        }
        let tree_ids = attr_ints(node, "nodes_treeids").map_err(e)?;
        let node_ids = attr_ints(node, "nodes_nodeids").map_err(e)?;
        let feature_ids = attr_ints(node, "nodes_featureids").map_err(e)?;
        let values = attr_floats(node, "nodes_values").map_err(e)?;
        let true_ids = attr_ints(node, "nodes_truenodeids").map_err(e)?;
        let false_ids = attr_ints(node, "nodes_falsenodeids").map_err(e)?;
        let modes: Vec<String> = node
            .get_attr_opt_tvec::<&str>("nodes_modes")
            .map_err(e)?
            .unwrap_or_default()
            .iter()
            .map(|s| s.to_string())
            .collect();
        let missing = attr_ints(node, "nodes_missing_value_tracks_true").map_err(e)?;
        let n = tree_ids.len();
        if n == 0 {
            return Err("has no nodes".into());
        }
        for (name, len) in [
            ("nodes_nodeids", node_ids.len()),
            ("nodes_featureids", feature_ids.len()),
            ("nodes_values", values.len()),
            ("nodes_truenodeids", true_ids.len()),
            ("nodes_falsenodeids", false_ids.len()),
            ("nodes_modes", modes.len()),
        ] {
            if len != n {
                return Err(format!("`{name}` has {len} entries, `nodes_treeids` {n}"));
            }
        }
        if !missing.is_empty() && missing.len() != n {
            return Err(format!(
                "`nodes_missing_value_tracks_true` has {} entries, `nodes_treeids` {n}",
                missing.len()
            ));
        }

        // Nodes are addressed by (tree id, node id); lay them out sorted.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (tree_ids[i], node_ids[i]));
        let mut position = std::collections::HashMap::with_capacity(n);
        for (at, &i) in order.iter().enumerate() {
            if position
                .insert((tree_ids[i], node_ids[i]), at as u32)
                .is_some()
            {
                return Err(format!(
                    "node {} of tree {} is defined twice",
                    node_ids[i], tree_ids[i]
                ));
            }
        }
        let child = |tree: i64, id: i64| -> Result<u32, String> {
            position
                .get(&(tree, id))
                .copied()
                .ok_or_else(|| format!("tree {tree} refers to node {id}, which it does not have"))
        };

        // Leaf weights, grouped by leaf.
        let prefix = if classifier { "class" } else { "target" };
        let w_trees = attr_ints(node, &format!("{prefix}_treeids")).map_err(e)?;
        let w_nodes = attr_ints(node, &format!("{prefix}_nodeids")).map_err(e)?;
        let w_ids = attr_ints(node, &format!("{prefix}_ids")).map_err(e)?;
        let w_values = attr_floats(node, &format!("{prefix}_weights")).map_err(e)?;
        let m = w_trees.len();
        if w_nodes.len() != m || w_ids.len() != m || w_values.len() != m {
            return Err(format!(
                "`{prefix}_treeids`, `{prefix}_nodeids`, `{prefix}_ids` and `{prefix}_weights` differ in length"
            ));
        }
        let mut leaf_weights: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n];

        let (n_targets, classifier_labels) = if classifier {
            let labels = Labels::parse(node, "classlabels_int64s")?;
            (labels.len(), Some(labels))
        } else {
            let n_targets: i64 = node.get_attr_opt("n_targets").map_err(e)?.unwrap_or(1);
            if !(1..=1 << 16).contains(&n_targets) {
                return Err(format!("`n_targets` is {n_targets}"));
            }
            (n_targets as usize, None)
        };
        for i in 0..m {
            let at = child(w_trees[i], w_nodes[i])?;
            let target = index(w_ids[i], &format!("`{prefix}_ids` entry"))?;
            if target as usize >= n_targets {
                return Err(format!(
                    "a leaf weight targets {target}, but there are {n_targets} {}",
                    if classifier { "classes" } else { "targets" }
                ));
            }
            leaf_weights[at as usize].push((target, w_values[i]));
        }

        let mut nodes = Vec::with_capacity(n);
        let mut node_modes = Vec::with_capacity(n);
        let mut missing_true = Vec::with_capacity(n);
        let mut weights = Vec::with_capacity(m);
        let mut roots = Vec::new();
        let mut n_features = 0usize;
        for (at, &i) in order.iter().enumerate() {
            if at == 0 || tree_ids[order[at - 1]] != tree_ids[i] {
                // The root of a tree is its node 0, or else its first node.
                roots.push(child(tree_ids[i], 0).unwrap_or(at as u32));
            }
            match Mode::parse(&modes[i])? {
                Some(mode) => {
                    let feature = index(feature_ids[i], "feature id")?;
                    n_features = n_features.max(feature as usize + 1);
                    nodes.push(Node {
                        feature,
                        threshold: values[i],
                        true_child: child(tree_ids[i], true_ids[i])?,
                        false_child: child(tree_ids[i], false_ids[i])?,
                    });
                    node_modes.push(mode);
                }
                None => {
                    let start = weights.len() as u32;
                    weights.extend_from_slice(&leaf_weights[at]);
                    nodes.push(Node {
                        feature: LEAF,
                        threshold: 0.0,
                        true_child: start,
                        false_child: weights.len() as u32,
                    });
                    node_modes.push(Mode::Leq);
                }
            }
            missing_true.push(missing.get(i).is_some_and(|&v| v != 0));
        }
        let depths = check_acyclic(&nodes, &roots)?;
        // Leaves become self-loops; their weights are found by node.
        let mut leaf_ranges = vec![(0u32, 0u32); nodes.len()];
        for (at, node) in nodes.iter_mut().enumerate() {
            if node.feature == LEAF {
                leaf_ranges[at] = (node.true_child, node.false_child);
                *node = Node {
                    feature: 0,
                    threshold: f32::NAN,
                    true_child: at as u32,
                    false_child: at as u32,
                };
            }
        }
        let single = leaf_ranges
            .iter()
            .zip(&nodes)
            .enumerate()
            .all(|(at, (&(a, b), n))| n.true_child != at as u32 || b == a + 1)
            .then(|| {
                leaf_ranges
                    .iter()
                    .map(|&(a, b)| if b > a { weights[a as usize] } else { (0, 0.0) })
                    .collect()
            });

        let aggregate = if classifier {
            Aggregate::Sum
        } else {
            match node.get_attr_opt::<&str>("aggregate_function").map_err(e)? {
                None | Some("SUM") => Aggregate::Sum,
                Some("AVERAGE") => Aggregate::Average,
                Some("MIN") => Aggregate::Min,
                Some("MAX") => Aggregate::Max,
                Some(other) => return Err(format!("unknown aggregate_function `{other}`")),
            }
        };
        let post_transform = PostTransform::parse(node)?;
        if !classifier && post_transform != PostTransform::None {
            return Err(format!(
                "post_transform {post_transform:?} on a regressor is not supported"
            ));
        }
        let base_values = attr_floats(node, "base_values").map_err(e)?;

        let classifier = match classifier_labels {
            None => {
                if !base_values.is_empty() && base_values.len() != n_targets {
                    return Err(format!(
                        "{} base values for {n_targets} targets",
                        base_values.len()
                    ));
                }
                None
            }
            Some(labels) => {
                let scored: std::collections::BTreeSet<u32> =
                    weights.iter().map(|&(c, _)| c).collect();
                let binary_one_class = labels.len() == 2 && scored.len() == 1;
                let weights_all_positive = weights.iter().all(|&(_, w)| w >= 0.0);
                if labels.len() < 2 {
                    return Err(format!("has {} class labels", labels.len()));
                }
                if labels.len() > 2 && !base_values.is_empty() && base_values.len() != labels.len()
                {
                    return Err(format!(
                        "{} base values for {} classes",
                        base_values.len(),
                        labels.len()
                    ));
                }
                if binary_one_class && weights_all_positive && post_transform != PostTransform::None
                {
                    return Err(format!(
                        "a binary classifier with positive weights and post_transform {post_transform:?} is not supported"
                    ));
                }
                Some(ClassifierLayout {
                    labels,
                    binary_one_class,
                    weights_all_positive,
                })
            }
        };

        let all_leq = node_modes.iter().all(|&m| m == Mode::Leq);
        let any_missing = missing_true.iter().any(|&b| b);
        Ok(Ensemble {
            nodes,
            leaf_weights: leaf_ranges,
            single,
            depths,
            modes: (!all_leq).then_some(node_modes),
            missing_true: any_missing.then_some(missing_true),
            roots,
            weights,
            n_targets,
            n_features,
            aggregate,
            post_transform,
            base_values,
            classifier,
        })
    }

    /// The leaf `row` reaches in the tree rooted at `root`, any node modes.
    fn leaf(&self, root: u32, row: &[f32]) -> u32 {
        let nodes = &self.nodes[..];
        let mut at = root;
        let mut node = &nodes[at as usize];
        while node.true_child != at || node.false_child != at {
            let x = row[node.feature as usize];
            let i = at as usize;
            let mode = self.modes.as_ref().map_or(Mode::Leq, |m| m[i]);
            let nan_true = self.missing_true.as_ref().is_some_and(|m| m[i]);
            at = if mode.goes_true(x, node.threshold) || (nan_true && x.is_nan()) {
                node.true_child
            } else {
                node.false_child
            };
            node = &nodes[at as usize];
        }
        at
    }

    /// scikit-learn's case (every branch `x <= threshold`, NaN goes right):
    /// up to [`LANES`] rows walk the tree together, so the loads of their
    /// independent paths overlap instead of each level waiting on the last,
    /// and every row takes the tree's depth in steps (a leaf loops on itself)
    /// so no step branches on whether a row has arrived.
    #[inline(always)]
    fn walk_lanes(&self, root: u32, depth: u32, rows: &[&[f32]], leaves: &mut [u32; LANES]) {
        let nodes = &self.nodes[..];
        let n = rows.len();
        leaves[..n].fill(root);
        for _ in 0..depth {
            for (at, row) in leaves[..n].iter_mut().zip(rows) {
                let node = &nodes[*at as usize];
                let x = row[node.feature as usize];
                *at = if x <= node.threshold {
                    node.true_child
                } else {
                    node.false_child
                };
            }
        }
    }

    /// Adds one leaf's weights to a row's scores.
    #[inline(always)]
    fn combine(&self, weights: &[(u32, f32)], s: &mut [f32], h: &mut [bool]) {
        for &(target, weight) in weights {
            let k = target as usize;
            match self.aggregate {
                Aggregate::Sum | Aggregate::Average => s[k] += weight,
                Aggregate::Min => {
                    if !h[k] || weight < s[k] {
                        s[k] = weight;
                    }
                }
                Aggregate::Max => {
                    if !h[k] || weight > s[k] {
                        s[k] = weight;
                    }
                }
            }
            h[k] = true;
        }
    }

    /// Raw aggregated scores of every row of `input` into `scores` (one
    /// row of `n_targets` per input row); `has` records which targets any
    /// leaf scored. Trees are the outer loop: one tree's nodes stay in
    /// cache while every row walks it.
    fn aggregate(&self, input: &[f32], width: usize, scores: &mut [f32], has: &mut [bool]) {
        let t = self.n_targets;
        scores.fill(0.0);
        has.fill(false);
        let simple = self.modes.is_none() && self.missing_true.is_none();
        let rows: Vec<&[f32]> = input.chunks_exact(width).collect();
        let mut leaves = [0u32; LANES];
        for (&root, &depth) in self.roots.iter().zip(&self.depths) {
            for (group, first) in rows.chunks(LANES).zip((0..).step_by(LANES)) {
                if simple {
                    self.walk_lanes(root, depth, group, &mut leaves);
                } else {
                    for (leaf, row) in leaves.iter_mut().zip(group) {
                        *leaf = self.leaf(root, row);
                    }
                }
                let leaves = &leaves[..group.len()];
                match (&self.single, self.aggregate) {
                    (Some(single), Aggregate::Sum | Aggregate::Average) => {
                        for (r, &leaf) in (first..).zip(leaves) {
                            let (k, w) = single[leaf as usize];
                            scores[r * t + k as usize] += w;
                            has[r * t + k as usize] = true;
                        }
                    }
                    _ => {
                        for (r, &leaf) in (first..).zip(leaves) {
                            let (a, b) = self.leaf_weights[leaf as usize];
                            let weights = &self.weights[a as usize..b as usize];
                            self.combine(
                                weights,
                                &mut scores[r * t..][..t],
                                &mut has[r * t..][..t],
                            );
                        }
                    }
                }
            }
        }
        if self.aggregate == Aggregate::Average {
            let trees = self.roots.len() as f32;
            scores.iter_mut().for_each(|s| *s /= trees);
        }
    }

    /// Runs the regressor over the rows of `input` (row-major, `width`
    /// columns): one output row of `n_targets` values per input row.
    fn regress(&self, input: &[f32], width: usize, out: &mut [f32]) {
        let t = self.n_targets;
        let mut has = vec![false; out.len()];
        self.aggregate(input, width, out, &mut has);
        if self.base_values.len() == t {
            for scores in out.chunks_exact_mut(t) {
                scores
                    .iter_mut()
                    .zip(&self.base_values)
                    .for_each(|(s, b)| *s += b);
            }
        }
    }

    /// Runs the classifier: the index of each row's label into `labels`,
    /// and its class scores (two columns for a binary classifier).
    fn classify(
        &self,
        layout: &ClassifierLayout,
        input: &[f32],
        width: usize,
        labels: &mut [usize],
        out: &mut [f32],
    ) {
        let c = layout.labels.len();
        let mut all_raw = vec![0.0f32; out.len()];
        let mut all_has = vec![false; out.len()];
        self.aggregate(input, width, &mut all_raw, &mut all_has);
        for (((raw, has), label), scores) in all_raw
            .chunks_exact_mut(c)
            .zip(all_has.chunks_exact_mut(c))
            .zip(labels.iter_mut())
            .zip(out.chunks_exact_mut(c))
        {
            if layout.binary_one_class {
                // One score s: onnxruntime adds the (single or second) base
                // value, picks the label from its sign (or from 0.5 when all
                // weights are positive) and writes the two columns.
                let class = has.iter().position(|&h| h).unwrap_or(0);
                let mut s = raw[class];
                match self.base_values.len() {
                    1 => s += self.base_values[0],
                    2 => s += self.base_values[class],
                    _ => {}
                }
                if layout.weights_all_positive {
                    *label = usize::from(s > 0.5);
                    scores[0] = 1.0 - s;
                    scores[1] = s;
                } else {
                    *label = usize::from(s > 0.0);
                    if self.post_transform == PostTransform::Logistic {
                        scores[0] = logistic(-s);
                        scores[1] = logistic(s);
                    } else {
                        scores[0] = -s;
                        scores[1] = s;
                    }
                }
                continue;
            }
            if self.base_values.len() == c {
                for k in 0..c {
                    raw[k] += self.base_values[k];
                    has[k] = true;
                }
            }
            // The first highest score among the scored classes.
            let mut best: Option<usize> = None;
            for k in 0..c {
                if has[k] && best.is_none_or(|b| raw[k] > raw[b]) {
                    best = Some(k);
                }
            }
            *label = best.unwrap_or(0);
            scores.copy_from_slice(raw);
            apply(self.post_transform, scores);
        }
    }
}

/// Every tree reachable from its root without revisiting a node (a cyclic
/// "tree" would loop forever on some row); returns each tree's depth in
/// branches.
fn check_acyclic(nodes: &[Node], roots: &[u32]) -> Result<Vec<u32>, String> {
    let mut seen = vec![false; nodes.len()];
    let mut stack = Vec::new();
    let mut depths = Vec::with_capacity(roots.len());
    for &root in roots {
        let mut deepest = 0;
        stack.push((root, 0u32));
        while let Some((at, depth)) = stack.pop() {
            let at = at as usize;
            if std::mem::replace(&mut seen[at], true) {
                return Err(format!(
                    "node at position {at} is reached twice: the trees are not trees"
                ));
            }
            let node = nodes[at];
            if node.feature != LEAF {
                stack.push((node.true_child, depth + 1));
                stack.push((node.false_child, depth + 1));
            } else {
                deepest = deepest.max(depth);
            }
        }
        depths.push(deepest);
    }
    Ok(depths)
}

pub(super) fn logistic(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub(super) fn apply(transform: PostTransform, scores: &mut [f32]) {
    match transform {
        PostTransform::None => {}
        PostTransform::Logistic => scores.iter_mut().for_each(|s| *s = logistic(*s)),
        PostTransform::Softmax => {
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            scores.iter_mut().for_each(|s| *s /= sum);
        }
        PostTransform::SoftmaxZero => {
            // Softmax over the non-zero scores; zeros stay zero.
            let max = scores
                .iter()
                .copied()
                .filter(|&s| s != 0.0)
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                if *s != 0.0 {
                    *s = (*s - max).exp();
                    sum += *s;
                }
            }
            if sum > 0.0 {
                scores.iter_mut().for_each(|s| *s /= sum);
            }
        }
    }
}

/// The tract operator evaluating an [`Ensemble`]: `[N, F]` in, for a
/// classifier `label [N]` and `scores [N, C]`, for a regressor `[N, T]`.
#[derive(Clone, Debug)]
pub struct TreeEnsembleOp {
    pub ensemble: Arc<Ensemble>,
}

impl PartialEq for TreeEnsembleOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.ensemble, &other.ensemble)
    }
}
impl Eq for TreeEnsembleOp {}

impl Op for TreeEnsembleOp {
    fn name(&self) -> StaticName {
        if self.ensemble.classifier.is_some() {
            "GatewayTreeEnsembleClassifier".into()
        } else {
            "GatewayTreeEnsembleRegressor".into()
        }
    }

    op_as_typed_op!();
}

impl EvalOp for TreeEnsembleOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let input = input.cast_to::<f32>()?;
        let shape = input.shape();
        ensure!(
            shape.len() == 2,
            "a tree ensemble takes a [rows, features] input, not shape {shape:?}"
        );
        let (rows, width) = (shape[0], shape[1]);
        let e = &self.ensemble;
        ensure!(
            width >= e.n_features,
            "the trees read feature {}, but rows have {width} columns",
            e.n_features.saturating_sub(1)
        );
        let data = input.try_as_plain_ram()?;
        let data = data.as_slice::<f32>()?;
        let mut scores = vec![0.0f32; rows * e.n_targets];
        if rows == 0 {
            // Nothing to walk; `chunks_exact` needs a non-zero width below.
        } else {
            ensure!(width > 0, "rows have no columns");
        }
        let width = width.max(1);
        match &e.classifier {
            None => {
                e.regress(data, width, &mut scores);
                Ok(tvec!(tensor2d(rows, e.n_targets, scores)?.into_tvalue()))
            }
            Some(layout) => {
                let mut label_ix = vec![0usize; rows];
                e.classify(layout, data, width, &mut label_ix, &mut scores);
                let labels = layout.labels.pick(&label_ix);
                Ok(tvec!(
                    labels.into_tvalue(),
                    tensor2d(rows, e.n_targets, scores)?.into_tvalue()
                ))
            }
        }
    }
}

pub(super) fn tensor2d(rows: usize, cols: usize, data: Vec<f32>) -> TractResult<Tensor> {
    tensor1(&data).into_shape(&[rows, cols])
}

impl TypedOp for TreeEnsembleOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].rank() == 2,
            "a tree ensemble takes a [rows, features] input"
        );
        let n = inputs[0].shape[0].clone();
        let scores = f32::fact([n.clone(), self.ensemble.n_targets.to_dim()]);
        Ok(match &self.ensemble.classifier {
            None => tvec!(scores),
            Some(layout) => {
                let label = TypedFact::dt_shape(layout.labels.datum_type(), [n]);
                tvec!(label, scores)
            }
        })
    }

    as_op!();
}

/// The inference-model side of the operator: its only job is to wire
/// [`TreeEnsembleOp`] into the typed model.
#[derive(Clone, Debug)]
pub struct TreeEnsembleExpansion(pub TreeEnsembleOp);

impl Expansion for TreeEnsembleExpansion {
    fn name(&self) -> StaticName {
        self.0.name()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(if self.0.ensemble.classifier.is_some() {
            2
        } else {
            1
        })
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        let e = &self.0.ensemble;
        s.equals(&inputs[0].rank, 2)?;
        let scores = match &e.classifier {
            None => {
                check_output_arity(outputs, 1)?;
                &outputs[0]
            }
            Some(layout) => {
                check_output_arity(outputs, 2)?;
                s.equals(&outputs[0].datum_type, layout.labels.datum_type())?;
                s.equals(&outputs[0].rank, 1)?;
                s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
                &outputs[1]
            }
        };
        s.equals(&scores.datum_type, DatumType::F32)?;
        s.equals(&scores.rank, 2)?;
        s.equals(&scores.shape[0], &inputs[0].shape[0])?;
        s.equals(&scores.shape[1], e.n_targets.to_dim())?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.0.clone(), inputs)
    }
}

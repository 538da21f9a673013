"""Graph classification with a message-passing network in linen, padded graph batches.

Each batch is one graph of all its graphs' nodes and edges (jraph's ``GraphsTuple`` layout,
built here in NumPy so that jraph is not needed), padded to fixed sizes with one padding
graph of zero features (as ``jraph.pad_with_graphs``), so that the step compiles once. The
network: an edge MLP on ``[x_senders, x_receivers]`` (its rows are the edges), a node MLP on
``[x, sum of incoming messages]`` (rows: the nodes), twice, and a mean readout per graph
into a classifier (rows: the graphs). The padding rows are kept out of each layer's local
Fisher with one ``sngd_jax.with_row_mask`` per kind of row (``docs/layer-coverage.md``,
*Graph networks*). The task: tell rings, stars and paths of 5 to 12 nodes apart from their
structure alone (every node's feature is 1); the accuracy printed is on a batch of graphs
never trained on.

Run from the repository root::

  python -m examples.gnn_graph_classification --steps 200
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sngd_jax
from examples import _common

MAX_NODES = 12
CLASSES = ("ring", "star", "path")


def random_graph(rng: np.random.Generator) -> tuple[int, np.ndarray, int]:
  """``(nodes, (E, 2) directed edges both ways, label)`` of a ring, a star or a path."""
  n, label = int(rng.integers(5, MAX_NODES + 1)), int(rng.integers(len(CLASSES)))
  i = np.arange(n)
  pairs = {0: np.stack([i, (i + 1) % n], 1), 1: np.stack([np.zeros(n - 1, int), i[1:]], 1),
           2: np.stack([i[:-1], i[1:]], 1)}[label]
  return n, np.concatenate([pairs, pairs[:, ::-1]]), label


def graph_batch(rng: np.random.Generator, graphs: int) -> dict[str, np.ndarray]:
  """``graphs`` graphs and one padding graph, padded to fixed node and edge counts."""
  max_nodes, max_edges = graphs * MAX_NODES + 1, graphs * 2 * MAX_NODES
  node_graph, senders, receivers, labels, offset = [], [], [], [], 0
  for g in range(graphs):
    n, edges, label = random_graph(rng)
    node_graph.append(np.full(n, g))
    senders.append(edges[:, 0] + offset)
    receivers.append(edges[:, 1] + offset)
    labels.append(label)
    offset += n
  real_nodes, real_edges = offset, sum(len(s) for s in senders)
  # the padding graph: the remaining nodes, and edges between its first node and itself
  node_graph.append(np.full(max_nodes - real_nodes, graphs))
  senders.append(np.full(max_edges - real_edges, real_nodes))
  receivers.append(np.full(max_edges - real_edges, real_nodes))
  node_graph = np.concatenate(node_graph)
  node_mask = np.arange(max_nodes) < real_nodes
  return dict(nodes=node_mask[:, None].astype(np.float32), senders=np.concatenate(senders),
              receivers=np.concatenate(receivers), node_graph=node_graph,
              labels=np.array(labels + [0]), node_mask=node_mask,
              edge_mask=np.arange(max_edges) < real_edges,
              graph_mask=np.arange(graphs + 1) < graphs)


class GNN(nn.Module):
  hidden: int = 32
  rounds: int = 2

  @nn.compact
  def __call__(self, nodes, senders, receivers, node_graph, num_graphs: int):
    n = nodes.shape[0]
    h = nodes
    for r in range(self.rounds):
      messages = nn.relu(nn.Dense(self.hidden, name=f"edge_{r}")(          # rows: edges
          jnp.concatenate([h[senders], h[receivers]], -1)))
      incoming = jax.ops.segment_sum(messages, receivers, num_segments=n)
      h = nn.relu(nn.Dense(self.hidden, name=f"node_{r}")(                 # rows: nodes
          jnp.concatenate([h, incoming], -1)))
    count = jax.ops.segment_sum(jnp.ones(n), node_graph, num_segments=num_graphs)
    pooled = jax.ops.segment_sum(h, node_graph, num_segments=num_graphs)
    pooled = pooled / jnp.maximum(count, 1.0)[:, None]
    return nn.Dense(len(CLASSES), name="head")(pooled)                      # rows: graphs


def masked(acts, batch):
  """The activations with the padding masks: edges, nodes and graphs, each on its layers."""
  acts = sngd_jax.with_row_mask(acts, batch["edge_mask"], where=lambda p: p.startswith("edge"))
  acts = sngd_jax.with_row_mask(acts, batch["node_mask"], where=lambda p: p.startswith("node"))
  return sngd_jax.with_row_mask(acts, batch["graph_mask"], where=lambda p: p == "head")


def main(argv=None):
  args = _common.parse_args(__doc__.splitlines()[0], steps=200, argv=argv, graphs=(int, 32),
                            lr=(float, 1e-2))
  rng = np.random.default_rng(args.seed)
  model = GNN()
  first = graph_batch(rng, args.graphs)
  held_out = graph_batch(np.random.default_rng(args.seed + 1), args.graphs)  # never trained on
  num_graphs = args.graphs + 1

  def apply(params, batch):
    return model.apply({"params": params}, batch["nodes"], batch["senders"],
                       batch["receivers"], batch["node_graph"], num_graphs)

  def loss_fn(params, batch):
    losses = optax.softmax_cross_entropy_with_integer_labels(apply(params, batch),
                                                            batch["labels"])
    return (losses * batch["graph_mask"]).sum() / batch["graph_mask"].sum()

  params = model.init(jax.random.key(args.seed), first["nodes"], first["senders"],
                      first["receivers"], first["node_graph"], num_graphs)["params"]
  print(sngd_jax.coverage(loss_fn, params, first))
  tx = sngd_jax.sngd_adam(args.lr)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    (loss, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(
        params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, activations=masked(acts, batch))
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def accuracy(params, batch):
    right = jnp.argmax(apply(params, batch), -1) == batch["labels"]
    return (right * batch["graph_mask"]).sum() / batch["graph_mask"].sum()

  for step in range(args.steps):
    batch = first if step == 0 else graph_batch(rng, args.graphs)
    params, opt_state, loss = train_step(params, opt_state, batch)
    _common.log(step, args.steps, float(loss),
                test_accuracy=float(accuracy(params, held_out)))


if __name__ == "__main__":
  main()

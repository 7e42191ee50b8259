"""2-D views (t-SNE, UMAP) and silhouette scores of learned projections, per embedding x method.

TG-MATL's paper repository shows embedding-space views of the test projections. Here each
(embedding, method) gets its silhouette scores in the projection space itself (64-d, Euclidean),
once with the class labels and once with the box clusters as the grouping, averaged over the folds,
and one 2-D map per view method of the fold-1 test projections: a panel per method, colour = class,
marker = box cluster. The maps only illustrate; the silhouette scores are the numbers to compare.
"""

from collections.abc import Mapping, Sequence

import numpy as np

from common import atomic, plots

VIEW_METHODS = ("tsne", "umap")
MARKERS = ("o", "^", "s", "D", "v", "P")


def silhouette(points: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (b - a) / max(a, b) over the points, Euclidean; nan with fewer than 2 groups.

    a: mean distance to the other members of the point's group (a point alone in its group scores
    0), b: the smallest mean distance to another group (scikit-learn's silhouette_score).
    """
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(labels):
        return float("nan")
    return float(silhouette_score(np.asarray(points, np.float64), labels, metric="euclidean"))


def project_2d(points: np.ndarray, view: str, seed: int) -> np.ndarray:
    """(N, D) -> (N, 2) by t-SNE (scikit-learn, PCA init) or UMAP (umap-learn, 15 neighbours)."""
    points = np.asarray(points, np.float32)
    if view == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(points) - 1) / 3)
        return TSNE(perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    if view == "umap":
        import umap

        neighbours = min(15, len(points) - 1)
        return umap.UMAP(n_neighbors=neighbours, random_state=seed, n_jobs=1).fit_transform(points)
    raise ValueError(f"unknown view {view!r}; expected one of {VIEW_METHODS}")


def silhouette_rows(
    projections: Mapping[tuple[str, str], Sequence[np.ndarray]], class_label, box_cluster
) -> list[dict]:
    """Rows (embedding, method, folds, silhouette_class, silhouette_box): fold means of the scores.

    `projections` maps (embedding, method) to the test projections of each fold.
    """
    rows = []
    for (embedding, method), per_fold in projections.items():
        by_class = [silhouette(points, class_label) for points in per_fold]
        by_box = [silhouette(points, box_cluster) for points in per_fold]
        rows.append(
            {
                "embedding": embedding,
                "method": method,
                "folds": len(per_fold),
                "silhouette_class": float(np.mean(by_class)),
                "silhouette_box": float(np.mean(by_box)),
            }
        )
    return rows


def plot_views(projections, class_label, box_cluster, views, seed, directory, class_names) -> list:
    """One PNG per (embedding, view): the fold-1 test projections of each method in 2-D."""
    plt = plots.pyplot()
    paths = []
    embeddings = list(dict.fromkeys(embedding for embedding, _ in projections))
    for embedding in embeddings:
        methods = [method for name, method in projections if name == embedding]
        for view in views:
            figure, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.6), squeeze=False)
            for axis, method in zip(axes[0], methods, strict=True):
                flat = project_2d(projections[(embedding, method)][0], view, seed)
                for cluster in np.unique(box_cluster):
                    member = box_cluster == cluster
                    axis.scatter(
                        flat[member, 0], flat[member, 1], c=class_label[member], cmap="viridis",
                        vmin=0, vmax=len(class_names) - 1, marker=MARKERS[cluster % len(MARKERS)], s=12,
                    )  # fmt: skip
                axis.set_title(f"{embedding} {method}", fontsize=9)
                axis.set_xticks([])
                axis.set_yticks([])
            figure.suptitle(f"{view}: colour = class ({', '.join(class_names)}), marker = box cluster")
            figure.tight_layout()
            paths.append(directory / f"{embedding}_{view}.png")
            plots.save(figure, paths[-1])
    return paths


def write_views(projections, class_label, box_cluster, directory, views=VIEW_METHODS, seed=0, class_names=()):
    """silhouette.csv / .json under `directory` and the 2-D maps of `views`; returns the rows."""
    rows = silhouette_rows(projections, class_label, box_cluster)
    columns = ["embedding", "method", "folds", "silhouette_class", "silhouette_box"]
    atomic.write_csv(directory / "silhouette.csv", rows, columns)
    atomic.write_json(directory / "silhouette.json", rows)
    names = list(class_names) or [str(c) for c in np.unique(class_label)]
    plot_views(projections, np.asarray(class_label), np.asarray(box_cluster), views, seed, directory, names)
    return rows

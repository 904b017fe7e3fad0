"""The ten Fashion-MNIST classes, in class-id order: a fact of the dataset that both deployables need.

The ingest stage counts them and the model stages name their reports with them; the serving side answers with
them. They live in the core, below both, so that serving never imports a stage to learn a label.
"""

# The textbook's labels (d2l `get_fashion_mnist_labels`), in class-id order.
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
NUM_CLASSES = len(CLASS_NAMES)

"""The target id that marks a position with nothing to predict.

It lives in the bottom layer because three layers that may not import each other need the
same value: data (the packed loader masks each document's first token), parallel and model
(the loss skips it), posttrain (only assistant tokens are trained). -100 is PyTorch's default
`ignore_index`, so `F.cross_entropy` skips it without being told twice.
"""

IGNORE_INDEX = -100

"""Export: packed artifact files (save/load), the exported program, and stored-size accounting."""
from jaxcompress.export.artifact import ArtifactReport as ArtifactReport
from jaxcompress.export.artifact import description_of as description_of
from jaxcompress.export.artifact import export_program as export_program
from jaxcompress.export.artifact import save as save
from jaxcompress.export.pack import TensorReport as TensorReport
from jaxcompress.export.reader import ArtifactError as ArtifactError
from jaxcompress.export.reader import ArtifactInfo as ArtifactInfo
from jaxcompress.export.reader import load as load
from jaxcompress.export.reader import load_program as load_program
from jaxcompress.export.size import SizeReport as SizeReport
from jaxcompress.export.size import leaf_bits as leaf_bits
from jaxcompress.export.size import size_report as size_report
from jaxcompress.export.shrink import ChannelGroup as ChannelGroup
from jaxcompress.export.shrink import Shrunk as Shrunk
from jaxcompress.export.shrink import channel_groups as channel_groups
from jaxcompress.export.shrink import shrink as shrink
from jaxcompress.export.shrink import tied_channel_masks as tied_channel_masks

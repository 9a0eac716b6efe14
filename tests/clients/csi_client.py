"""A CSI client built on grpcio (gRPC C-core), for tests/clients.rs.

C-core dials unix:///PATH with the percent-encoded socket path as :authority, unlike grpc-go
and tonic, which send localhost; the CSI socket's HTTP/2 layer refuses that authority, so the
channel sets grpc.default_authority=localhost, the client-side fix README documents. Every call
must succeed (or fail with the code the CSI spec names). Stubs are generated from the driver's
own proto into a scratch directory.

usage: csi_client.py SOCKET PROTO_DIR SCRATCH_DIR
"""

import os
import sys


def generate(proto_dir, out_dir):
    from grpc_tools import protoc
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main([
        "protoc",
        "-I", proto_dir,
        "-I", include,
        "--python_out=" + out_dir,
        "--grpc_python_out=" + out_dir,
        os.path.join(proto_dir, "csi.proto"),
    ])
    if rc != 0:
        sys.exit("protoc failed with %d" % rc)
    sys.path.insert(0, out_dir)


def main():
    socket, proto_dir, scratch = sys.argv[1:4]
    generate(proto_dir, scratch)
    import grpc
    import csi_pb2 as pb
    import csi_pb2_grpc as rpc

    calls = 0
    options = [("grpc.default_authority", "localhost")]
    with grpc.insecure_channel("unix://" + socket, options=options) as channel:
        identity = rpc.IdentityStub(channel)
        controller = rpc.ControllerStub(channel)
        node = rpc.NodeStub(channel)
        timeout = 30

        info = identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=timeout)
        assert info.name, info
        identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=timeout)
        probe = identity.Probe(pb.ProbeRequest(), timeout=timeout)
        assert probe.ready.value, probe
        controller.ControllerGetCapabilities(
            pb.ControllerGetCapabilitiesRequest(), timeout=timeout)
        calls += 4

        cap = pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(fs_type="ext4"),
            access_mode=pb.VolumeCapability.AccessMode(
                mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
        )
        created = controller.CreateVolume(
            pb.CreateVolumeRequest(
                name="grpcio-client",
                capacity_range=pb.CapacityRange(required_bytes=16 << 20),
                volume_capabilities=[cap],
            ),
            timeout=timeout,
        )
        volume_id = created.volume.volume_id
        assert volume_id and created.volume.capacity_bytes >= 16 << 20, created
        listed = controller.ListVolumes(pb.ListVolumesRequest(), timeout=timeout)
        assert volume_id in [e.volume.volume_id for e in listed.entries], listed
        calls += 2

        try:
            controller.CreateVolume(pb.CreateVolumeRequest(name=""), timeout=timeout)
            sys.exit("CreateVolume without a name succeeded")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        calls += 1

        node_info = node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=timeout)
        assert node_info.node_id, node_info
        node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=timeout)
        calls += 2

        controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=timeout)
        listed = controller.ListVolumes(pb.ListVolumesRequest(), timeout=timeout)
        assert volume_id not in [e.volume.volume_id for e in listed.entries], listed
        calls += 2

        # Many calls on one connection keep both HPACK tables in step.
        for _ in range(200):
            identity.Probe(pb.ProbeRequest(), timeout=timeout)
        calls += 200

    print("ok %d calls" % calls)


if __name__ == "__main__":
    main()
